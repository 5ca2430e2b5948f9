"""Throughput of the GranD image stages, and how much of each stage's wall time is spent in model calls.

Run from the repository root::

    .venv/bin/python -m groundmill.benchmarks.bench_stages                 # 5 bundled photos, table + one JSON line
    .venv/bin/python -m groundmill.benchmarks.bench_stages --images 8 --max-side 512

Each stage is built with its `tiny` model (random weights; the text embedder of `grounding` is the
real MiniLM), set up once, warmed on one image, then run over the batch in the demo manifest's order,
so every stage sees the annotations of the ones before. "Model" time is wall time inside torch
modules' forward calls (outermost module call only), measured with global module hooks; the rest is
pre/post-processing, decoding, RLE encoding, generation loops and Python logic.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from groundmill.pipeline.config import stage_params
from groundmill.schema import new_record
from groundmill.stages import stage_class
from groundmill.stages.base import ModelSpec, Resources, Sample

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
# (label, registry name, params, model id): the demo manifest's order and settings
PLAN: list[tuple[str, str, dict[str, Any], str]] = [
    ("tagging", "tagging", {"top_k": 8, "min_score": 0.02}, "tiny"),
    ("landmark", "landmark", {}, "tiny"),
    ("detect_owlv2", "detection", {"detector": "owlv2", "max_boxes": 4, "classes": ["person"]}, "tiny"),
    ("detect_grounding_dino", "detection", {"detector": "grounding_dino", "max_boxes": 4}, "tiny"),
    ("voting", "voting", {"min_iou": 0.1}, "tiny"),
    ("masks", "masks", {}, "tiny"),
    ("depth", "depth", {}, "tiny"),
    ("attributes", "attributes", {"min_attribute_prob": 0.1}, "tiny"),
    ("captions", "captions", {"num_captions": 3, "generation": {"max_new_tokens": 16}}, "tiny"),
    ("grounding", "grounding", {"min_similarity": 0.3}, "sentence-transformers/all-MiniLM-L6-v2"),
]


class ModelClock:
    """Wall time spent inside outermost torch.nn.Module calls while active."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0
        self._start = 0.0

    def _pre(self, module: Any, args: Any) -> None:
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1

    def _post(self, module: Any, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._start

    def __enter__(self) -> ModelClock:
        hooks = torch.nn.modules.module
        self._handles = [
            hooks.register_module_forward_pre_hook(self._pre),
            hooks.register_module_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()


def photo_samples(count: int, max_side: int) -> list[Sample]:
    """`count` image samples cycling over scikit-image's bundled photos, at most `max_side` px."""
    import skimage

    data_dir = Path(skimage.__file__).parent / "data"
    samples = []
    for n in range(count):
        im = Image.open(data_dir / PHOTOS[n % len(PHOTOS)]).convert("RGB")
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, "PNG")
        key = f"{n:016x}"
        media = {"type": "image", "ext": "png", "width": im.width, "height": im.height}
        record = new_record(key, {"uri": key, "sha256": "", "bytes": buf.tell(), "format": "PNG"}, media, [])
        samples.append(
            Sample(uri=key, key=key, media_type="image", data=buf.getvalue(), frames=[], record=record)
        )
    return samples


def run(count: int, max_side: int, gpu: bool = False) -> list[dict[str, Any]]:
    samples = photo_samples(count, max_side)
    warm = photo_samples(1, max_side)
    rows = []
    for label, name, params, model_id in PLAN:
        cls = stage_class(name)
        resources = Resources(num_gpus=1 if gpu else 0)  # device "auto": the GPU only when one is asked for
        stage = cls(stage_params(cls, params, label), ModelSpec(id=model_id), resources, seed=0)
        start = time.perf_counter()
        stage.setup()
        setup_s = time.perf_counter() - start
        stage.process(warm)  # first-call costs (lazy init, allocator) are not throughput
        with ModelClock() as clock:
            start = time.perf_counter()
            stage.process(samples)
            wall = time.perf_counter() - start
        rows.append(
            {
                "stage": label,
                "model": model_id,
                "setup_s": round(setup_s, 2),
                "wall_s": round(wall, 3),
                "images_per_s": round(count / wall, 2),
                "model_share": round(min(1.0, clock.seconds / wall), 3) if wall else 0.0,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--gpu", action="store_true", help="run the models on CUDA")
    args = parser.parse_args(argv)
    rows = run(args.images, args.max_side, args.gpu)
    print(f"{'stage':24} {'images/s':>9} {'model %':>8} {'other %':>8} {'wall s':>8} {'setup s':>8}")
    for r in rows:
        share = r["model_share"] * 100
        print(
            f"{r['stage']:24} {r['images_per_s']:9.2f} {share:8.1f} {100 - share:8.1f} "
            f"{r['wall_s']:8.2f} {r['setup_s']:8.2f}"
        )
    total = sum(r["wall_s"] for r in rows)
    summary = {
        "benchmark": "bench_stages",
        "images": args.images,
        "max_side": args.max_side,
        "device": torch.cuda.get_device_name() if args.gpu else "cpu",
        "threads": torch.get_num_threads(),
        "end_to_end_images_per_s": round(args.images / total, 3),
        "stages": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
