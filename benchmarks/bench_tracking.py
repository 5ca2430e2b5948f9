"""Tracking throughput and memory: the SAM2 tracker over the generated shapes video.

Run from the repository root::

    .venv/bin/python -m groundmill.benchmarks.bench_tracking                  # frames/s table + one JSON line
    .venv/bin/python -m groundmill.benchmarks.bench_tracking --memory --frames 24 --chunk-frames 4

The keyframe objects are the shapes themselves (colour masks of the decoded keyframes), so the tracker
has real objects to follow whatever the detector's weights. `--image-size` sets the input size of the
`tiny` random-init SAM2 (smaller is faster on CPU); real checkpoints keep their own size.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from groundmill.media import FrameSampling, probe_video, sampled_frames, upright
from groundmill.pipeline.config import VideoConfig
from groundmill.pipeline.demo_data import write_shapes_video
from groundmill.stages.base import ModelSpec, Resources
from groundmill.stages.tracking import Detection, Sam2Propagator, track_video

# The shapes of pipeline.demo_data.write_shapes_video and their colours.
SHAPE_COLOURS = {"red disc": (220, 40, 40), "blue square": (40, 60, 220), "green disc": (40, 200, 60)}


def colour_mask(image: np.ndarray, rgb: tuple[int, int, int], tolerance: float = 60.0) -> np.ndarray:
    """Pixels within `tolerance` (RGB distance) of a colour: the shapes' ground-truth masks."""
    return np.linalg.norm(image.astype(np.float32) - np.array(rgb, np.float32), axis=-1) < tolerance


def shapes_detections(
    data: bytes, frame_indices: list[int], min_area: int = 20
) -> dict[int, list[Detection]]:
    """Hand-built keyframe objects: one per shape visible on each of `frame_indices`."""
    out: dict[int, list[Detection]] = {}
    wanted = set(frame_indices)
    for index, _, frame in sampled_frames(data, FrameSampling()):
        if index in wanted:
            image = np.asarray(upright(frame, 0))
            out[index] = [
                Detection(mask, [label], {"frame_index": index, "object_id": n})
                for n, (label, rgb) in enumerate(SHAPE_COLOURS.items())
                if (mask := colour_mask(image, rgb)).sum() >= min_area
            ]
        if index >= max(wanted):
            break
    return out


def load_predictor(image_size: int | None) -> Any:
    from groundmill.stages import sam2_models

    if image_size:
        sam2_models.TINY_IMAGE_SIZE = image_size
    os.environ.setdefault("TQDM_DISABLE", "1")
    return sam2_models.load_video_predictor(ModelSpec(), Resources(), seed=0)


class PeakRss:
    """The peak RSS of this process while active, above the RSS at entry.

    On Linux the kernel's own high-water mark (VmHWM) is reset on entry and read on exit, which
    sees every transient peak; elsewhere a thread samples RSS, which can miss short ones.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.process = psutil.Process()

    @staticmethod
    def _reset_kernel_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
            return True
        except OSError:
            return False

    @staticmethod
    def _kernel_peak() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise OSError("no VmHWM in /proc/self/status")

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = self.process.memory_info().rss
        self._kernel = self._reset_kernel_peak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if not self._kernel:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        if self._kernel:
            self.peak = max(self.peak, self._kernel_peak())
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


def run_once(
    predictor: Any,
    video: Path,
    *,
    chunk_frames: int,
    detections: dict[int, list[Detection]] | None = None,
    keyframes: int = 4,
) -> dict[str, float]:
    """Track one video (its shapes on `keyframes` keyframes unless `detections` are given)."""
    data = video.read_bytes()
    if detections is None:
        v = probe_video(data, "mp4", keyframes=keyframes, sparse_frames=0, sampling=FrameSampling())
        detections = shapes_detections(data, v.keyframe_indices)
    frames = ((i, t, upright(f, 0)) for i, t, f in sampled_frames(data, FrameSampling()))
    with PeakRss() as rss:
        start = time.perf_counter()
        result = track_video(
            frames, detections, Sam2Propagator(predictor),
            chunk_frames=chunk_frames, min_iou=0.5, max_missing=8, max_tracks=50, min_area=16,
        )  # fmt: skip
        elapsed = time.perf_counter() - start
    return {
        "frames": result.frames,
        "chunks": result.chunks,
        "tracks": len(result.tracks),
        "seconds": round(elapsed, 3),
        "frames_per_s": round(result.frames / elapsed, 3),
        "peak_rss_growth_mb": round(rss.growth_mb, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[16])
    parser.add_argument("--chunk-frames", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--size", type=int, nargs=2, default=[160, 120], metavar=("W", "H"))
    parser.add_argument("--image-size", type=int, default=0, help="tiny SAM2 input size (0: its default)")
    parser.add_argument("--keyframes", type=int, default=VideoConfig.keyframes)
    parser.add_argument("--memory", action="store_true", help="one run per setting, JSON only (for tests)")
    args = parser.parse_args(argv)

    predictor = load_predictor(args.image_size)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        warm = write_shapes_video(
            Path(folder) / "warm.mp4", num_frames=3, size=tuple(args.size), enter_at=None
        )
        run_once(predictor, warm, keyframes=1, chunk_frames=2)  # allocator and caches settle first
        for n in args.frames:
            video = write_shapes_video(
                Path(folder) / f"v{n}.mp4", num_frames=n, size=tuple(args.size), enter_at=n // 2
            )
            for chunk in args.chunk_frames:
                row = {
                    "video_frames": n,
                    "chunk_frames": chunk,
                    "width": args.size[0],
                    "height": args.size[1],
                }
                rows.append(row | run_once(predictor, video, keyframes=args.keyframes, chunk_frames=chunk))
    summary = {
        "bench": "tracking",
        "model": "tiny (random weights)",
        "image_size": predictor.image_size,
        "device": str(predictor.device),
        "torch_threads": __import__("torch").get_num_threads(),
        "rows": rows,
    }
    if not args.memory:
        cols = [
            "video_frames",
            "chunk_frames",
            "chunks",
            "tracks",
            "seconds",
            "frames_per_s",
            "peak_rss_growth_mb",
        ]
        print(f"SAM2 tracking, tiny random-init model at {predictor.image_size} px on {predictor.device}")
        print(" | ".join(f"{c:>18}" for c in cols))
        for row in rows:
            print(" | ".join(f"{row[c]:>18}" for c in cols))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
