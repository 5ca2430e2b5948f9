"""The bundled demo inputs: real photos shipped inside scikit-image's wheel, and a short video of
moving shapes generated with PyAV (one shape enters mid-clip, for the video engine's discovery)."""

from __future__ import annotations

import shutil
from pathlib import Path

import av
import numpy as np

DEMO_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")


def write_shapes_video(
    path: str | Path,
    num_frames: int = 24,
    size: tuple[int, int] = (160, 120),
    fps: int = 8,
    enter_at: int | None = 12,
) -> Path:
    """An H.264 mp4 with a red disc moving right, a blue square moving down, and (from frame
    `enter_at`) a green disc entering from the right edge."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18"}
        for t in range(num_frames):
            frame = np.zeros((height, width, 3), dtype=np.uint8)
            frame[:] = (40 + t, 90, 60)  # slowly changing background
            cx, cy = 20 + t * (width - 40) / max(1, num_frames - 1), height * 0.35
            frame[(xx - cx) ** 2 + (yy - cy) ** 2 < 14**2] = (220, 40, 40)
            sx, sy = width * 0.3, 10 + t * (height - 40) / max(1, num_frames - 1)
            frame[(abs(xx - sx) < 12) & (abs(yy - sy) < 12)] = (40, 60, 220)
            if enter_at is not None and t >= enter_at:
                gx = width + 10 - (t - enter_at) * 8
                frame[(xx - gx) ** 2 + (yy - height * 0.7) ** 2 < 12**2] = (40, 200, 60)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_demo_inputs(dest: str | Path) -> list[Path]:
    """Copy the demo photos and generate the demo video into `dest` (idempotent)."""
    import skimage

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    data_dir = Path(skimage.__file__).parent / "data"
    written = []
    for name in DEMO_PHOTOS:
        target = dest / name
        if not target.exists():
            shutil.copyfile(data_dir / name, target)
        written.append(target)
    video = dest / "shapes.mp4"
    if not video.exists():
        write_shapes_video(video)
    written.append(video)
    return written
