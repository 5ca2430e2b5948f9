"""The one definition of a groundmill sample: the JSON record stored in each shard, and the index row.

A shard sample is two adjacent tar members sharing the key: ``{key}.{media_ext}`` (the normalised
image, or the video file) and ``{key}.json`` (a :class:`Record`). The Parquet index has one
:data:`INDEX_SCHEMA` row per input, errors included.

The record follows GranD's per-image layout (objects, floating_objects, landmark, captions,
relationships.grounding, dense_caption, additional_context) and adds what video and provenance need.
For a video, the image stages annotate sampled keyframes: ``record["keyframes"][i]`` is a
:class:`FrameRecord` holding the same per-image fields, and tracks carry per-frame masklets.
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum
from typing import Any, NotRequired, TypedDict

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

SCHEMA_VERSION = 1

# ---------------------------------------------------------------------------------------------------------
# Masks: COCO RLE with a string `counts`, JSON-safe.


class RLE(TypedDict):
    size: list[int]  # [height, width]
    counts: str


def encode_mask(mask: np.ndarray) -> RLE:
    """Binary HxW mask -> COCO compressed RLE with `counts` as str."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: RLE) -> np.ndarray:
    """COCO RLE (str or bytes counts) -> bool HxW mask."""
    counts = rle["counts"]
    coco = {
        "size": list(rle["size"]),
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }
    return mask_utils.decode(coco).astype(bool)


def mask_bbox(rle: RLE) -> list[float]:
    """Tight xyxy box of an RLE mask (all zeros if empty)."""
    coco = {"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}
    x, y, w, h = mask_utils.toBbox(coco).tolist()
    return [x, y, x + w, y + h]


def mask_area(rle: RLE) -> int:
    return int(mask_utils.area({"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}))


# ---------------------------------------------------------------------------------------------------------
# The record.


class Object(TypedDict):
    id: int
    bbox: list[float]  # xyxy, pixels of the stored (normalised) image
    labels: list[str]  # best first
    attributes: list[str]
    score: float
    detectors: list[str]  # which models proposed it (cross-model voting)
    segmentation: NotRequired[RLE]
    segmentation_source: NotRequired[str]  # "SAM2", a detector's mask, ...
    predicted_iou: NotRequired[float]
    mask_in_box: NotRequired[bool]  # False flags a mask whose box disagrees with its prompt box
    depth: NotRequired[float]  # median normalised depth inside the mask (0 near .. 1 far)
    depth_layer: NotRequired[str]


class Tag(TypedDict):
    label: str
    score: float


class Caption(TypedDict):
    text: str
    model: str


class Grounding(TypedDict):
    phrase: str
    caption_index: int  # which entry of `captions`
    tokens_positive: list[int]  # [start, end) character span into that caption
    object_ids: list[int]


class Landmark(TypedDict):
    category: str
    fine: str
    score: float


class DenseDetail(TypedDict):
    phrase: str
    tokens_positive: list[int]
    ids: list[int]
    bbox: list[list[float]]


class DenseCaption(TypedDict):
    caption: str
    details: list[DenseDetail]
    verification: NotRequired[dict[str, Any]]


class VotingRule(TypedDict):
    """How a frame's detections were split into objects and floating objects (GranD's agreement rule)."""

    min_iou: float
    min_dice: float
    max_objects: int
    masks: bool  # True once mask Dice was checked too (the masks stage re-votes); False: boxes alone
    attribute_vocabulary: str  # detections named only by these words are floating attributes


class FloatingAttribute(TypedDict):
    """A box a detector found for an attribute phrase ("red", "wooden"), not an object (see stages.voting)."""

    bbox: list[float]  # xyxy, pixels of the stored image
    attributes: list[str]  # the phrase's words
    score: float
    detector: str


class FrameRecord(TypedDict, total=False):
    """Everything the image stages write; the whole record for an image, one keyframe for a video."""

    frame_index: int
    time_s: float
    landmark: Landmark
    tags: list[Tag]
    # Raw per-model boxes before voting: detection stage name -> [{bbox (xyxy), label, score}]
    detections: dict[str, list[dict[str, Any]]]
    voting: VotingRule  # written by the voting stage, re-applied with masks by the masks stage
    objects: list[Object]
    floating_objects: list[Object]
    floating_attributes: list[FloatingAttribute]
    captions: list[Caption]
    relationships: dict[str, Any]  # {"grounding": [Grounding], "relations": [...]}
    scene_graph: dict[str, Any]
    dense_caption: DenseCaption
    referring_expressions: list[dict[str, Any]]  # {object_id, expression, source: template|llm, ...}
    additional_context: str
    # LLM stage -> {prompt_id, template_hash, prompt_hash, backend, attempts, finish_reason, tokens}
    generations: dict[str, dict[str, Any]]
    llm_drops: list[
        dict[str, Any]
    ]  # LLM outputs dropped after retries: {stage, reason, attempts, prompt_id, ...}


class Media(TypedDict, total=False):
    type: str  # "image" | "video"
    ext: str  # extension of the stored media member
    width: int
    height: int
    # video only
    fps: float
    num_frames: int
    duration_s: float
    rotation: int  # clockwise display rotation applied to every frame (sizes above are upright)
    sampling: dict[str, Any]  # {fps, stride, max_frames, num_sampled}: which frames keyframes/tracks use


class Source(TypedDict):
    uri: str
    sha256: str
    bytes: int
    format: str


class Record(FrameRecord, total=False):
    schema_version: int
    key: str
    source: Source
    media: Media
    normalisation: list[str]  # what was done to make the stored image RGB and upright
    keyframes: list[FrameRecord]  # video only
    sparse_frames: list[dict[str, Any]]  # video only: {frame_index, time_s} of sparse context frames
    tracks: list[dict[str, Any]]  # video only: {track_id, labels, masklet: {frame: RLE}, consistency, ...}
    frame_times: dict[str, float]  # video only: time_s of every frame the tracker covered (masklet keys)
    expressions: list[dict[str, Any]]  # video only: Ref-SAV style per-track expressions
    video_captions: list[Caption]  # video only: the template caption, then an LLM one if it kept every label
    gcg: dict[str, Any]  # GranD-f GCG form: {file_name, caption, groundings}
    provenance: dict[str, dict[str, Any]]  # stage -> {model, random_weights, version, prompt_hash, ...}


def new_record(key: str, source: Source, media: Media, normalisation: list[str]) -> Record:
    return Record(
        schema_version=SCHEMA_VERSION,
        key=key,
        source=source,
        media=media,
        normalisation=normalisation,
        provenance={},
    )


def frame_records(record: Record) -> list[FrameRecord]:
    """The per-image parts of a record: itself for an image, its keyframes for a video."""
    if record["media"]["type"] == "video":
        return record.setdefault("keyframes", [])
    return [record]


# ---------------------------------------------------------------------------------------------------------
# Keys.

_KEY_RE = re.compile(r"^[0-9a-f]{16,64}$")


def content_key(data: bytes, length: int = 24) -> str:
    """A stable sample key: the hex SHA-256 of the input bytes, truncated (never contains a dot)."""
    return hashlib.sha256(data).hexdigest()[:length]


def is_valid_key(key: str) -> bool:
    return bool(_KEY_RE.match(key))


# ---------------------------------------------------------------------------------------------------------
# Invariants, checked by the sink's tests and by anyone reading shards.


def check_record(record: Record) -> list[str]:
    """Problems with a record (empty list if none): mask sizes, exact phrase spans, floating attribute
    boxes inside the image and naming an attribute."""
    problems: list[str] = []
    media = record["media"]
    size = [media["height"], media["width"]]
    for f, frame in enumerate(frame_records(record)):
        for group in ("objects", "floating_objects"):
            for obj in frame.get(group, []):
                seg = obj.get("segmentation")
                if seg is not None and list(seg["size"]) != size:
                    problems.append(f"frame {f} {group} {obj['id']}: mask size {seg['size']} != {size}")
        for attr in frame.get("floating_attributes", []):
            x0, y0, x1, y1 = attr["bbox"]
            if not (0 <= x0 < x1 <= media["width"] and 0 <= y0 < y1 <= media["height"]):
                problems.append(f"frame {f}: floating attribute box {attr['bbox']} is not inside the image")
            if not attr["attributes"]:
                problems.append(f"frame {f}: floating attribute at {attr['bbox']} names no attribute")
        captions = frame.get("captions", [])
        for g in frame.get("relationships", {}).get("grounding", []):
            text = captions[g["caption_index"]]["text"]
            s, e = g["tokens_positive"]
            if text[s:e] != g["phrase"]:
                problems.append(f"frame {f}: span {s}:{e} of caption is {text[s:e]!r}, not {g['phrase']!r}")
        dense = frame.get("dense_caption")
        if dense:
            for d in dense["details"]:
                s, e = d["tokens_positive"]
                if dense["caption"][s:e] != d["phrase"]:
                    problems.append(f"frame {f}: dense span {s}:{e} is not {d['phrase']!r}")
    for track in record.get("tracks", []):
        for frame_idx, seg in track.get("masklet", {}).items():
            if list(seg["size"]) != size:
                problems.append(f"track {track['track_id']} frame {frame_idx}: mask size {seg['size']}")
    return problems


# ---------------------------------------------------------------------------------------------------------
# The Parquet index: one row per input.

STATUS_OK = "ok"
STATUS_ERROR = "error"


class ErrorCode(StrEnum):
    """Stable machine codes of per-input failures (an error row's reason starts with `[code]`)."""

    UNREADABLE = "unreadable"  # an I/O error reading the input
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"  # over limits.max_file_mb, or a video over its size / length limits
    CORRUPT = "corrupt"  # truncated or malformed file or tar
    UNSUPPORTED_FORMAT = "unsupported_format"  # not an allowlisted image format or video demuxer
    BOMB = "bomb"  # decodes to more pixels or bytes than limits allow
    UNSAFE_PATH = "unsafe_path"  # a tar member that is absolute or traverses with `..`
    UNSAFE_URI = "unsafe_uri"  # a scheme not allowlisted, credentials or options in a URI
    NOT_REGULAR_FILE = "not_regular_file"  # a FIFO, device, directory or link where a file was expected
    EMPTY = "empty"


def error_reason(code: ErrorCode | str, reason: str) -> str:
    """The index's error text: `[code] reason`, so the code survives in the free-text column."""
    return f"[{code}] {reason}"


INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # content hash; null when the input could not be read at all
        ("uri", pa.string()),
        ("shard", pa.string()),  # tar file name (relative to the output dir); null for errors
        ("media_type", pa.string()),
        ("bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("duplicate_of", pa.string()),  # uri of the input whose sample this one shares
        ("num_objects", pa.int32()),
        ("timings", pa.map_(pa.string(), pa.float64())),  # stage -> seconds for this sample
        ("stats", pa.map_(pa.string(), pa.float64())),  # per-sample quality figures (verification, ...)
    ]
)
