"""The four layers and which may import which (README, "Layout"), checked on every module's imports:
`import`/`from` statements at any depth, relative ones included, and module names passed as strings
to importlib (f-strings by their constant prefix).

    foundation  schema, media, shards, checkpoints (package root)  imports only the foundation
    stages      stages/, prompts/                              + the foundation, + model/ (the x2sam
                                                               stage runs a trainer checkpoint)
    model       model/                                         + the foundation (never stages/ or
                                                               pipeline/, so stages -> model has no cycle)
    pipeline    pipeline/, benchmarks/                         anything
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOUNDATION = {
    "groundmill",
    "groundmill.schema",
    "groundmill.media",
    "groundmill.shards",
    "groundmill.checkpoints",
}
ALLOWED = {
    "foundation": {"foundation"},
    "stages": {"foundation", "stages", "model"},
    "model": {"foundation", "model"},
    "pipeline": {"foundation", "stages", "model", "pipeline"},
}


def layer(module: str) -> str | None:
    """The layer of a groundmill module name (None: not ours, or tests and data packages)."""
    if module in FOUNDATION or any(module.startswith(f + ".") for f in FOUNDATION - {"groundmill"}):
        return "foundation"
    top = module.split(".")[1] if module.startswith("groundmill.") else None
    return {
        "stages": "stages",
        "prompts": "stages",
        "model": "model",
        "pipeline": "pipeline",
        "benchmarks": "pipeline",
    }.get(top)


def module_name(path: Path) -> str:
    parts = ["groundmill", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _string_prefix(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value).rstrip(".")
    return None


def imported_modules(source: str, module: str, is_package: bool) -> list[str]:
    """Every groundmill module `source` (the text of `module`) imports."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from groundmill import stages` imports a package of a layer, not a name of the root
            found += [f"{base}.{a.name}" for a in node.names] if base == "groundmill" else [base]
        elif isinstance(node, ast.Call) and node.args:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__", "find_spec"):
                found.append(_string_prefix(node.args[0]) or "")
    return [m for m in found if m == "groundmill" or m.startswith("groundmill.")]


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    own = layer(module)
    if own is None:
        return []
    return [
        f"{module} ({own}) imports {m} ({layer(m)})"
        for m in imported_modules(source, module, is_package)
        if layer(m) is not None and layer(m) not in ALLOWED[own]
    ]


def sources() -> list[Path]:
    """The package's modules: no tests, no hidden or build folders, links never followed."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "out", "build")]
        found += [Path(folder) / f for f in files if f.endswith(".py")]
    return found


def test_every_module_imports_only_the_layers_below_it():
    found = [v for p in sources() for v in violations(p.read_text(), module_name(p), p.name == "__init__.py")]
    assert found == []


def test_every_layer_has_modules():
    layers = {layer(module_name(p)) for p in sources()}
    assert layers >= {"foundation", "stages", "model", "pipeline"}


@pytest.mark.parametrize(
    ("module", "source", "bad"),
    [
        (
            "groundmill.stages.x",
            "from groundmill.pipeline.config import ModelSpec",
            "groundmill.pipeline.config",
        ),
        ("groundmill.stages.x", "def f():\n    from groundmill.pipeline import media", "groundmill.pipeline"),
        ("groundmill.stages.x", "from ..pipeline import graph", "groundmill.pipeline"),
        ("groundmill.model.x", "import groundmill.stages.base", "groundmill.stages.base"),
        ("groundmill.model.x", "from groundmill import stages", "groundmill.stages"),
        ("groundmill.shards", "from groundmill.stages.base import Sample", "groundmill.stages.base"),
        (
            "groundmill.media",
            "importlib.import_module('groundmill.pipeline.config')",
            "groundmill.pipeline.config",
        ),
        ("groundmill.schema", "importlib.import_module(f'groundmill.stages.{name}')", "groundmill.stages"),
    ],
)
def test_the_check_finds_upward_imports(module, source, bad):
    """The checker itself, on hand-written sources: each names the forbidden import."""
    assert [v.split(" imports ")[1].split(" ")[0] for v in violations(source, module)] == [bad]


def test_the_check_allows_imports_within_and_below():
    ok = (
        "from groundmill.schema import Record\nfrom groundmill.media import decode_rgb\n"
        "from . import base\nimportlib.import_module(f'groundmill.stages.{m}')\nimport numpy"
    )
    assert violations(ok, "groundmill.stages.x") == []
    assert violations("from groundmill.stages import stage_class", "groundmill.pipeline.config") == []
