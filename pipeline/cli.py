"""The `groundmill` command."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from groundmill.pipeline.config import ConfigError, apply_cpu, load_config
from groundmill.pipeline.export import FORMATS as EXPORT_FORMATS
from groundmill.pipeline.sources import SourceError
from groundmill.schema import SchemaVersionError

GRAND_MANIFEST = Path(__file__).parent.parent / "manifests" / "grand.yaml"

# Subcommands implemented elsewhere take their own argv: name -> "module:function".
DELEGATED = {
    "train": ("groundmill.model.train:main", "train the X2SAM model on shards"),
    "eval": ("groundmill.model.eval:main", "evaluate a checkpoint"),
    "bench-train": ("groundmill.model.bench:main", "train the tiny config on synthetic data and evaluate"),
    "plan": ("groundmill.pipeline.plan:main", "GPU-hours, wall-clock and dollars of a manifest on a corpus"),
    "review": (
        "groundmill.pipeline.review:main",
        "uncertain objects to Label Studio tasks, and decisions back",
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="groundmill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="annotate the inputs of a manifest into shards + index")
    run.add_argument("manifest")
    run.add_argument(
        "--input", action="append", help="folder, glob, .jsonl/.parquet list or .tar (repeatable)"
    )
    run.add_argument("--output", help="output directory (overrides output.dir)")
    run.add_argument("--address", help="Ray cluster address (overrides ray.address)")
    run.add_argument(
        "--cpu",
        action="store_true",
        help="run a GPU manifest on CPUs: no GPU requests or GPU dtypes, vLLM stages on transformers, "
        "one actor pool (run.json lists each substitution)",
    )
    run.add_argument(
        "--from",
        dest="parent",
        metavar="OLD_OUT",
        help="derive the output from OLD_OUT's records: rerun only the stages whose settings changed",
    )
    run.add_argument(
        "--retry-errors",
        action="store_true",
        help="annotate again the error rows of transient failures (io, timeout, llm_unavailable, ...)",
    )
    run.add_argument(
        "overrides", nargs="*", help="dotted config overrides, e.g. stages.tagging.params.top_k=5"
    )

    inspect = sub.add_parser("inspect", help="summarise an output directory")
    inspect.add_argument("out_dir")
    inspect.add_argument("--json", action="store_true", help="print JSON for machines")

    report = sub.add_parser("report", help="write a self-contained HTML report of an output directory")
    report.add_argument("out_dir")
    report.add_argument("--output", help="HTML file to write (default: OUT_DIR/report.html)")
    report.add_argument("--max-samples", type=int, default=24, help="samples shown in the gallery")

    export = sub.add_parser("export", help="write an output dir in a field tool's format (coco, grandf, ...)")
    export.add_argument("out_dir")
    export.add_argument("--format", required=True, choices=list(EXPORT_FORMATS), dest="export_format")
    export.add_argument("--output", required=True, help="destination directory")
    export.add_argument("--stride", type=int, default=4, help="refsav: annotate every n-th frame (Sa2VA: 4)")
    export.add_argument("--split", default="train", help="coco: the split written into refs.json")
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    export.add_argument("--negatives", action="store_true", help="coco, grandf: add the hard negatives")
    export.add_argument(
        "--verified-only", action="store_true", help="coco: leave out objects the mask verifier rejected"
    )

    sample = sub.add_parser("sample", help="write the bundled demo inputs (real photos + a generated video)")
    sample.add_argument("dest")

    fixture = sub.add_parser("fixture", help="write test fixtures")
    kinds = fixture.add_subparsers(dest="fixture", required=True)
    hub = kinds.add_parser(
        "hub",
        help="an offline Hugging Face cache with a tiny random-weight model for each hub id of a manifest",
    )
    hub.add_argument("dir", help="cache directory to fill (use it as HF_HUB_CACHE)")
    hub.add_argument("--manifest", default=str(GRAND_MANIFEST), help="manifest whose models to write")

    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in DELEGATED:
        module, func = DELEGATED[argv[0]][0].split(":")
        return getattr(importlib.import_module(module), func)(argv[1:]) or 0
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "run" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # overrides after the options: `run M --output D key=value`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "inspect":
            from groundmill.pipeline.inspect import format_summary, summarize

            summary = summarize(args.out_dir)
            print(json.dumps(summary) if args.json else format_summary(summary))
            return 0
        if args.command == "report":
            from groundmill.pipeline.report import write_report

            print(write_report(args.out_dir, args.output, args.max_samples))
            return 0
        if args.command == "export":
            return _export(args)
        if args.command == "fixture":
            from groundmill.pipeline.fixture import write_hub_fixture

            cfg = load_config(args.manifest, ["inputs=[-]"])  # only its models matter, not its inputs
            for repo, snapshot in write_hub_fixture(args.dir, cfg).items():
                print(f"{repo}\t{snapshot}")
            return 0
        if args.command == "sample":
            from groundmill.pipeline.demo_data import write_demo_inputs

            for path in write_demo_inputs(args.dest):
                print(path)
            return 0
    except (
        ConfigError,
        SourceError,
        SchemaVersionError,
        OSError,
    ) as e:  # OSError: unreadable input, unwritable or full output
        print(f"groundmill: error: {e}", file=sys.stderr)
        return 2
    return 1


def _export(args: argparse.Namespace) -> int:
    from groundmill.pipeline.export import export

    options = {
        "refsav": {"stride": args.stride},
        "coco": {"split": args.split, "negatives": args.negatives, "verified_only": args.verified_only},
        "grandf": {"negatives": args.negatives},
    }.get(args.export_format, {})
    counts = export(args.out_dir, args.export_format, args.output, progress=not args.no_progress, **options)
    print(f"{args.output}: " + ", ".join(f"{n} {what}" for what, n in counts.items()))
    return 0


def _run(args: argparse.Namespace) -> int:
    from groundmill.pipeline.inspect import format_summary, summarize
    from groundmill.pipeline.run import run_pipeline

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output.dir={args.output}")
    if args.address:
        overrides.append(f"ray.address={args.address}")
    if args.input:
        overrides.append(f"inputs={json.dumps(args.input)}")
    cfg = load_config(args.manifest, overrides)
    substitutions = apply_cpu(cfg, cfg.ray.num_cpus or os.cpu_count() or 1) if args.cpu else []
    run_pipeline(cfg, substitutions, parent=args.parent, retry_errors=args.retry_errors)
    print(format_summary(summarize(cfg.output.dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
