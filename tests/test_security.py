"""Security: hostile tar member names are refused, nothing on the data path unpickles, checkpoints
load with weights_only or safetensors, and a manifest cannot execute code."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import pytest
from omegaconf.errors import OmegaConfBaseException

from groundmill.pipeline.config import ConfigError, load_config
from groundmill.pipeline.run import run_pipeline
from groundmill.pipeline.sources import list_inputs, read_uri
from groundmill.schema import is_valid_key
from groundmill.shards import SHARDS_DIR, iter_shard
from groundmill.tests.media_factory import rgb_jpeg

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", "tests", "out", ".git", "build", "groundmill.egg-info", "__pycache__"}


def _tar(path: Path, members: list[tuple[str, bytes]], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


@pytest.mark.parametrize(
    "name", ["../escape.jpg", "a/../../escape.jpg", "/etc/escape.jpg", "a\\..\\escape.jpg"]
)
def test_input_shards_with_traversal_or_absolute_member_names_are_refused(tmp_path, name):
    shard = _tar(tmp_path / "in.tar", [("ok.jpg", rgb_jpeg()), (name, rgb_jpeg(2))])
    with pytest.raises(ValueError, match="unsafe member path"):
        list_inputs([str(shard)])
    with pytest.raises(ValueError, match="unsafe member path"):
        list(iter_shard(shard))
    with pytest.raises(ValueError, match="unsafe member path"):
        read_uri(f"{shard}#{name}", 2**20)
    assert not (tmp_path.parent / "escape.jpg").exists()


def test_input_shards_with_links_are_refused(tmp_path):
    shard = _tar(tmp_path / "in.tar", [("ok.jpg", rgb_jpeg())], symlink="link.jpg")
    with pytest.raises(ValueError, match="not a regular file"):
        list_inputs([str(shard)])
    with pytest.raises(ValueError, match="not a regular file"):
        list(iter_shard(shard))


def test_manifest_yaml_tags_cannot_construct_objects(tmp_path):
    canary = tmp_path / "pwned"
    for payload in (
        f'!!python/object/apply:os.system ["touch {canary}"]',
        f'!!python/object/new:subprocess.Popen [["touch", "{canary}"]]',
        "!!python/name:os.system",
    ):
        manifest = tmp_path / "evil.yaml"
        manifest.write_text(f"inputs: [{tmp_path}]\nrun:\n  name: {payload}\n")
        with pytest.raises(ConfigError, match="python/"):
            load_config(manifest)
        assert not canary.exists()


def test_manifest_interpolation_cannot_evaluate_code(tmp_path, monkeypatch):
    canary = tmp_path / "pwned"
    manifest = tmp_path / "evil.yaml"
    for payload, error in (
        ("${eval:1+1}", "Unsupported interpolation type eval"),
        (f"\"${{eval:__import__('os').system('touch {canary}')}}\"", "token recognition error"),
    ):
        manifest.write_text(f"inputs: [{tmp_path}]\nrun:\n  name: {payload}\n")
        # Unknown resolvers fail when the config is resolved (omegaconf's error names the key).
        with pytest.raises((ConfigError, OmegaConfBaseException), match=error):
            load_config(manifest)
    assert not canary.exists()
    # omegaconf's own environment resolver is fine: it reads, it does not run.
    monkeypatch.setenv("GM_RUN_NAME", "from-env")
    manifest.write_text(f"inputs: [{tmp_path}]\nrun:\n  name: ${{oc.env:GM_RUN_NAME}}\n")
    assert load_config(manifest).run.name == "from-env"


def _sources() -> list[Path]:
    return [p for p in REPO.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(REPO).parts[:-1])]


def _calls(text: str, func: str) -> list[str]:
    """The full argument text of every call to `func(` in `text` (parentheses matched)."""
    calls = []
    for m in re.finditer(re.escape(func) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        calls.append(text[m.start() : i])
    return calls


def test_no_unsafe_deserialisation_or_code_execution_in_the_source():
    sources = _sources()
    assert len(sources) > 20, "the source walk found too little: is REPO right?"
    problems = []
    for path in sources:
        text = path.read_text()
        where = path.relative_to(REPO)
        for pattern in (
            r"\bpickle\.loads?\(", r"\bcPickle\b", r"\bdill\b", r"\bjoblib\.load\(", r"\bmarshal\.loads?\(",
            r"\byaml\.(unsafe_load|full_load)\(", r"(?<![\w.])(eval|exec)\(", r"register_new_resolver",
            r"trust_remote_code\s*=\s*True", r"allow_pickle\s*=\s*True", r"\bshell\s*=\s*True",
        ):  # fmt: skip
            if re.search(pattern, text):
                problems.append(f"{where}: {pattern}")
        problems += [f"{where}: {c}" for c in _calls(text, "torch.load") if "weights_only=True" not in c]
        problems += [f"{where}: {c}" for c in _calls(text, "yaml.load") if "SafeLoader" not in c]
    assert not problems, "\n".join(problems)


def test_sam2_checkpoints_load_with_weights_only():
    import inspect

    from sam2.build_sam import _load_checkpoint

    assert _calls(inspect.getsource(_load_checkpoint), "torch.load")
    assert all("weights_only=True" in c for c in _calls(inspect.getsource(_load_checkpoint), "torch.load"))


@pytest.mark.slow
def test_shards_hold_only_media_and_json(tmp_path, ray_local):
    from groundmill.pipeline.demo_data import write_shapes_video

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):
        (inputs / f"img{i}.jpg").write_bytes(rgb_jpeg(seed=i + 1))
    write_shapes_video(inputs / "clip.mp4", num_frames=8)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"inputs: [{inputs}]\noutput: {{dir: {tmp_path / 'out'}}}\n"
        "stages:\n  tagging:\n    model: {id: tiny}\n    params: {top_k: 3}\n"
    )
    run_pipeline(load_config(manifest))
    names = []
    for shard in (tmp_path / "out" / SHARDS_DIR).glob("*.tar"):
        with tarfile.open(shard) as tar:
            names += tar.getnames()
    assert len(names) == 6
    for name in names:
        key, ext = name.split(".", 1)
        assert is_valid_key(key) and ext in {"jpg", "png", "mp4", "json"}, name
