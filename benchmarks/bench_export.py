"""Export throughput and peak memory: `groundmill export` of every format over N copies of a run.

Run from the repository root, on a finished run (e.g. `make demo`'s `out/demo`)::

    .venv/bin/python -m benchmarks.bench_export out/demo --copies 10 --work out/bench_export

The copies are the run's own records (written by the real stages) with their pictures perturbed and
re-encoded so every copy has its own content key, written with the engine's ShardWriter in uniform
shards (schema v2; v1 records are upgraded). Each format is exported in a fresh process whose peak
RSS (VmHWM) is reported; the table and one JSON line give samples/s and MiB per format.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from groundmill.pipeline.export import FORMATS
from groundmill.pipeline.export.common import iter_samples
from groundmill.schema import STATUS_OK, content_key
from groundmill.shards import ShardWriter, fresh_scratch_dir


def _perturbed_jpeg(data: bytes, copy_index: int) -> bytes:
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()
    pixels[0, 0] = (pixels[0, 0].astype(int) + copy_index + 1) % 256  # one pixel: another content key
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# The media kinds each format reads (its throughput counts those samples).
READS = {
    "coco": ("image",),
    "grandf": ("image",),
    "grand": ("image",),
    "refsav": ("video",),
    "hf": ("image", "video"),
}


def write_copies(source: Path, dest: Path, copies: int, per_shard: int = 64) -> dict[str, int]:
    """`copies` copies of every sample of `source` under `dest`; returns the samples per media kind."""
    writers: dict[str, ShardWriter] = {}
    kinds: dict[str, int] = {"image": 0, "video": 0}
    n = 0
    for i in range(copies):
        for s in iter_samples(source, progress=False):
            record = copy.deepcopy(s.record)
            kind = record["media"]["type"]
            if kind == "image":
                data, ext = _perturbed_jpeg(s.media, i), "jpg"
            else:  # the video bytes as stored; the key alone tells the copies apart
                data, ext = s.media, s.ext
            key = content_key(data + (b"" if kind == "image" else str(i).encode()))
            record.update(key=key, media={**record["media"], "ext": ext})
            if "gcg" in record:
                record["gcg"]["file_name"] = f"{key}.{ext}"
            writer = writers.setdefault(kind, ShardWriter(dest, name=f"bench-{kind}-{ext}-{n:06d}"))
            row = {"uri": f"bench://{i}/{s.key}", "media_type": kind, "status": STATUS_OK,
                   "width": record["media"]["width"], "height": record["media"]["height"]}  # fmt: skip
            writer.add_sample(key, data, ext, record, row)
            n += 1
            kinds[kind] += 1
            if writer.num_samples >= per_shard:
                writers.pop(kind).commit()
    for writer in writers.values():
        writer.commit()
    return kinds


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that across exec, so a
    child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _export_once(out: str, fmt: str, dest: str) -> None:
    from groundmill.pipeline.export import export

    start = time.perf_counter()
    counts = export(out, fmt, dest, progress=False)
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    print(json.dumps({"format": fmt, "seconds": round(seconds, 3), "peak_rss_mib": round(peak, 1), **counts}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", help="a finished output dir")
    p.add_argument("--copies", type=int, default=10)
    p.add_argument("--work", default="out/bench_export")
    p.add_argument("--one", nargs=3, metavar=("OUT", "FORMAT", "DEST"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        _export_once(*a.one)
        return
    work = Path(a.work)
    fresh_scratch_dir(work)
    samples = write_copies(Path(a.source), work / "copies", a.copies)
    results = []
    for fmt in FORMATS:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.bench_export",
            "--one",
            str(work / "copies"),
            fmt,
            str(work / fmt),
        ]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(line))
    print(f"{samples} ({a.copies} copies of {a.source})")
    print(f"{'format':8s} {'samples':>8s} {'seconds':>8s} {'samples/s':>10s} {'peak RSS MiB':>13s}")
    for r in results:
        r["samples"] = sum(samples[k] for k in READS[r["format"]])
        r["samples_per_s"] = round(r["samples"] / r["seconds"], 2)
        print(
            f"{r['format']:8s} {r['samples']:8d} {r['seconds']:8.2f} {r['samples_per_s']:10.1f} {r['peak_rss_mib']:13.1f}"
        )
    print(json.dumps({"samples": samples, "formats": results}))


if __name__ == "__main__":
    main()
