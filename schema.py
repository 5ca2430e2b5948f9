"""The one definition of a groundmill sample: the JSON record stored in each shard, and the index row.

A shard sample is two adjacent tar members sharing the key: ``{key}.{media_ext}`` (the normalised
image, or the video file) and ``{key}.json`` (a :class:`Record`). The Parquet index has one
:data:`INDEX_SCHEMA` row per input, errors included.

The record follows GranD's per-image layout (objects, floating_objects, landmark, captions,
relationships.grounding, dense_caption, additional_context) and adds what video and provenance need.
For a video, the image stages annotate sampled keyframes: ``record["keyframes"][i]`` is a
:class:`FrameRecord` holding the same per-image fields, and tracks carry per-frame masklets.

Schema v2: no dict key depends on the data (tools that infer one column type per key, such as Hugging
Face ``datasets``, read every record alike). GCG groundings are a list of :class:`GCGGrounding`, a
track's masklet is a list of :class:`MaskletFrame` covering every sampled frame (empty masks stated),
and ``frame_times`` is a list of :class:`FrameTime`. Every nested shape is a TypedDict below, and
:func:`check_record` checks records against them. :func:`upgrade_record` reads v1 records as v2.
"""

from __future__ import annotations

import functools
import hashlib
import re
import types
import typing
from enum import StrEnum
from typing import Any, NotRequired, TypedDict

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

SCHEMA_VERSION = 2

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


class MaskFeatures(TypedDict, total=False):
    """The mask verifier's evidence for one object (stages.mask_verification), each in [0, 1]."""

    predicted_iou: float
    stability: float
    box_agreement: float
    boundary_alignment: float
    clip_agreement: float
    concept_confirmed: float  # 1.0 when the concept-restricted detector pass found this object (exhaustivity)


class MaskVerification(TypedDict):
    """Whether an object's mask and label are trusted: a score, the decision and why not."""

    score: float
    accepted: bool
    reasons: list[str]  # the checks it failed ("boundary_alignment < 0.35", "judge: reject", ...)
    features: NotRequired[MaskFeatures]
    judge: NotRequired[str]  # the VLM judge's answer: accept | reject | error
    reviewed: NotRequired[bool]  # True when a person decided (groundmill review import)


class Concept(TypedDict):
    """Per (image, phrase): is the phrase present, and is every instance of it masked? (stages.exhaustivity)"""

    phrase: str
    present: bool
    exhaustive: bool
    object_ids: list[int]
    unmatched: NotRequired[int]  # detector or automatic-mask hits of the phrase matched to no object


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
    stability_score: NotRequired[float]  # IoU of the mask at logit thresholds -delta and +delta (SAM)
    verification: NotRequired[MaskVerification]  # stages.mask_verification
    depth: NotRequired[float | None]  # median normalised depth inside the mask (0 near .. 1 far)
    depth_layer: NotRequired[str]
    replaced: NotRequired[ReplacedMask]  # the mask this one replaced (stages/prefer_masks.py)


class ReplacedMask(TypedDict):
    segmentation: RLE
    segmentation_source: str
    reason: str  # the comparison that preferred the new mask


class X2SamMask(TypedDict):
    """One text's mask from a trainer checkpoint (stages/x2sam.py), beside SAM2's."""

    kind: str  # referring | gcg | labels | phrases: where the text came from
    text: str
    object_ids: list[int]  # the objects the text names in the record (none for a fixed phrase)
    segmentation: RLE
    segmentation_source: str  # "x2sam"
    score: float  # mean mask probability inside the mask


class StuffRegion(TypedDict):
    """An amorphous region (sky, grass, wall) of one stuff class (stages.stuff, CASS); its id
    continues after the frame's objects so relations and GCG groundings can name it."""

    id: int
    label: str
    segmentation: RLE
    score: float  # mean class probability over the region
    area: int  # pixels


def is_verified(obj: Object) -> bool:
    """Whether an object may be used: the mask verifier accepted it, or no verifier ran."""
    return obj.get("verification", {}).get("accepted", True)


class Detection(TypedDict):
    """One raw box of a detector, before voting."""

    bbox: list[float]  # xyxy, pixels of the stored image
    label: str
    score: float
    # The masks stage's SAM2 mask of this box, until voting moves it to the object the box leads
    # (DETECTION_MASK_FIELDS): a record at rest keeps each mask once, on its object.
    segmentation: NotRequired[RLE]
    segmentation_source: NotRequired[str]
    predicted_iou: NotRequired[float]
    mask_in_box: NotRequired[bool]
    stability_score: NotRequired[float]


DETECTION_MASK_FIELDS = (
    "mask_in_box",
    "segmentation",
    "segmentation_source",
    "predicted_iou",
    "stability_score",
)


class Tag(TypedDict):
    label: str
    score: float


class Caption(TypedDict):
    text: str
    model: str
    prompt_id: NotRequired[str]
    prompt_hash: NotRequired[str]


class Grounding(TypedDict):
    phrase: str
    caption_index: int  # which entry of `captions`
    tokens_positive: list[int]  # [start, end) character span into that caption
    object_ids: list[int]


class Relation(TypedDict):
    subject: int
    predicate: str
    object: int


class Relationships(TypedDict, total=False):
    grounding: list[Grounding]
    relations: list[Relation]


class Landmark(TypedDict):
    category: str
    fine: str
    score: float


class DenseDetail(TypedDict):
    phrase: str
    tokens_positive: list[int]
    ids: list[int]
    bbox: list[list[float]]


class Checklist(TypedDict, total=False):
    """The LLM's list of objects a caption claims, and those that match no object (or why it failed)."""

    claims: list[str]
    unmatched: list[str]
    unmatched_rate: float
    error: str | None
    prompt_id: str
    template_hash: str
    prompt_hash: str


class Verification(TypedDict):
    """How well a dense caption's noun phrases ground in the scene graph (stages.verification)."""

    noun_phrases: int
    grounded: int
    hallucinated: list[str]
    hallucination_rate: float
    accepted: bool
    regenerated: NotRequired[int]
    checklist: NotRequired[Checklist]


class DenseCaption(TypedDict):
    caption: str
    details: list[DenseDetail]
    verification: NotRequired[Verification]


class VotingRule(TypedDict):
    """How a frame's detections were split into objects and floating objects (GranD's agreement rule)."""

    min_iou: float
    min_dice: float
    min_agreeing: NotRequired[int]  # other detection stages that must agree (absent in older records: 1)
    max_objects: int
    masks: bool  # True: mask Dice was checked too (the masks stage ran before voting); False: boxes alone
    attribute_vocabulary: str  # detections named only by these words are floating attributes


class FloatingAttribute(TypedDict):
    """A box a detector found for an attribute phrase ("red", "wooden"), not an object (see stages.voting)."""

    bbox: list[float]  # xyxy, pixels of the stored image
    attributes: list[str]  # the phrase's words
    score: float
    detector: str


class SceneNode(TypedDict):
    id: int
    label: str
    attributes: list[str]
    phrases: list[str]
    bbox: list[float]
    score: float
    depth: float | None
    layer: str
    floating: bool


class SceneName(TypedDict):
    category: str
    fine: str


class SceneStuff(TypedDict):
    """A stuff region as scene-graph context: objects relate to it (`on`, `in front of`, `under`)."""

    id: int
    label: str
    attributes: list[str]  # empty: lets verification ground phrases to stuff like to objects
    bbox: list[float]
    area_frac: float  # share of the image


class SceneGraph(TypedDict):
    scene: SceneName | None
    captions: list[str]
    objects: list[SceneNode]
    layers: dict[str, list[int]]  # depth layer (a fixed vocabulary: stages.scene_graph.LAYERS) -> ids
    groups: list[list[int]]
    relations: list[Relation]
    dropped_objects: int
    stuff: NotRequired[list[SceneStuff]]  # background context, when the stuff stage ran
    background: NotRequired[list[Relation]]  # object -> on / in front of / under -> stuff region id


class ReferringExpression(TypedDict):
    """An expression that fits its object and no other of the image (stages.refexp)."""

    object_id: int
    expression: str
    source: str  # template | llm
    template: NotRequired[str]  # the template an LLM paraphrase replaced
    paraphrase_rejected: NotRequired[str]
    prompt_id: NotRequired[str]
    template_hash: NotRequired[str]
    prompt_hash: NotRequired[str]


class Generation(TypedDict):
    """Where an LLM text came from (stages.llm.stage.LLMStage.record_output)."""

    prompt_id: str
    template_hash: str
    prompt_hash: str
    backend: str
    attempts: int
    finish_reason: str | None
    tokens: int


class LLMDrop(TypedDict):
    """An LLM output given up after its attempts: the sample is kept without it (GranD)."""

    stage: str
    reason: str | None
    attempts: int
    prompt_id: str
    template_hash: str
    prompt_hash: str


class FrameRecord(TypedDict, total=False):
    """Everything the image stages write; the whole record for an image, one keyframe for a video."""

    frame_index: int
    time_s: float
    landmark: Landmark
    tags: list[Tag]
    # Raw per-model boxes before voting: detection stage name -> [{bbox (xyxy), label, score}]
    detections: dict[str, list[Detection]]
    voting: VotingRule  # the rule the voting stage applied
    objects: list[Object]
    floating_objects: list[Object]
    floating_attributes: list[FloatingAttribute]
    stuff: list[StuffRegion]  # stages.stuff
    coverage: float  # share of pixels under objects, floating objects or stuff (set when written)
    captions: list[Caption]
    relationships: Relationships
    scene_graph: SceneGraph
    dense_caption: DenseCaption
    referring_expressions: list[ReferringExpression]
    additional_context: str
    generations: dict[str, Generation]  # LLM stage name (from the manifest) -> its provenance
    llm_drops: list[LLMDrop]
    x2sam: list[X2SamMask]
    concepts: list[Concept]  # stages.exhaustivity
    negatives: list[str]  # phrases verified absent: hard negatives (stages.exhaustivity)


class FrameSamplingInfo(TypedDict):
    fps: float
    stride: int
    max_frames: int
    num_sampled: int


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
    sampling: FrameSamplingInfo  # which frames keyframes and tracks use


class Source(TypedDict):
    uri: str
    sha256: str
    bytes: int
    format: str


class GCGGrounding(TypedDict):
    """One grounded phrase of a GCG caption; `rle_masks` are its objects' masks, in `object_ids` order."""

    phrase: str
    tokens_positive: list[int]  # [start, end) into the caption
    object_ids: list[int]
    rle_masks: list[RLE]


class GCG(TypedDict):
    """A verified, grounded dense caption in GranD-f's GCG form (GLaMM GranDf_gcg_ds), as a list."""

    file_name: str
    caption: str
    groundings: list[GCGGrounding]


class FrameTime(TypedDict):
    frame_index: int  # index in the decoded video
    time_s: float


class MaskletFrame(TypedDict):
    frame_index: int
    segmentation: RLE  # empty where the object is not visible


class TrackOrigin(TypedDict):
    frame_index: int
    object_id: int


class Track(TypedDict):
    """One object through a video (stages.tracking); its masklet has one entry per sampled frame."""

    track_id: int
    labels: list[str]
    masklet: list[MaskletFrame]  # in frame order, exactly the frames of `frame_times`
    first_frame: int  # first and last frame where it is visible
    last_frame: int
    consistency: float
    origin: NotRequired[TrackOrigin]


class ExpressionLevels(TypedDict, total=False):
    object_level: str
    scene_level: str
    video_level: str


class VideoExpression(TypedDict):
    """Ref-SAV style expressions of one track at three levels (stages.video_expressions)."""

    track_id: int
    object_level: str
    scene_level: str
    video_level: str
    prompt_id: NotRequired[str]  # provenance: what the engine's stage writes (other writers may not)
    prompt_hash: NotRequired[str]
    source: NotRequired[ExpressionLevels]  # level -> template | llm
    rendered_hashes: NotRequired[ExpressionLevels]
    templates: NotRequired[ExpressionLevels]  # the templates LLM rewrites replaced
    rewrite_rejected: NotRequired[ExpressionLevels]


class SparseFrame(TypedDict):
    frame_index: int
    time_s: float


class Record(FrameRecord, total=False):
    schema_version: int
    key: str
    source: Source
    media: Media
    normalisation: list[str]  # what was done to make the stored image RGB and upright
    keyframes: list[FrameRecord]  # video only
    sparse_frames: list[SparseFrame]  # video only: sparse context frames
    tracks: list[Track]  # video only
    frame_times: list[FrameTime]  # video only: every frame the tracker covered, in order
    expressions: list[VideoExpression]  # video only
    video_captions: list[Caption]  # video only: the template caption, then an LLM one if it kept every label
    gcg: GCG  # image only
    near_duplicate_of: (
        str  # key of an earlier sample whose CLIP embedding is this close (stages.near_duplicates)
    )
    provenance: dict[str, dict[str, Any]]  # stage name (from the manifest) -> model, version, prompt hash...


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


def frame_coverage(frame: FrameRecord, height: int, width: int) -> float:
    """Share of a frame's pixels inside the union of its objects', floating objects' and stuff
    regions' masks (RLE union, no decoding)."""
    rles = [
        {"size": list(r["segmentation"]["size"]), "counts": r["segmentation"]["counts"].encode("ascii")}
        for g in ("objects", "floating_objects", "stuff")
        for r in frame.get(g, [])
        if "segmentation" in r and list(r["segmentation"]["size"]) == [height, width]
    ]
    if not rles or height * width == 0:
        return 0.0
    return round(float(mask_utils.area(mask_utils.merge(rles, intersect=False))) / (height * width), 4)


def annotate_coverage(record: Record) -> float:
    """Write each frame's `coverage` (and, for a video, the keyframes' mean on the record); returns
    the record's coverage."""
    media = record["media"]
    frames = frame_records(record)
    for frame in frames:
        frame["coverage"] = frame_coverage(frame, media["height"], media["width"])
    if media["type"] == "video":
        record["coverage"] = round(float(np.mean([f["coverage"] for f in frames])), 4) if frames else 0.0
    return record.get("coverage", 0.0)


# ---------------------------------------------------------------------------------------------------------
# Keys.

_KEY_RE = re.compile(r"^[0-9a-f]{16,64}$")


def content_key(data: bytes, length: int = 24) -> str:
    """A stable sample key: the hex SHA-256 of the input bytes, truncated (never contains a dot)."""
    return hashlib.sha256(data).hexdigest()[:length]


def is_valid_key(key: str) -> bool:
    return bool(_KEY_RE.match(key))


# ---------------------------------------------------------------------------------------------------------
# Reading records of any version.


class SchemaVersionError(ValueError):
    """A record newer than this groundmill, or of no known version."""


def masklet_by_frame(track: Track) -> dict[int, RLE]:
    """frame_index -> mask of a track's masklet."""
    return {m["frame_index"]: m["segmentation"] for m in track["masklet"]}


def empty_rle(height: int, width: int) -> RLE:
    """The all-zero mask: one run of h*w zeros (what encode_mask gives, without building the array)."""
    return encode_mask(np.zeros((height, width), dtype=bool))


def _upgrade_v1(record: dict[str, Any]) -> dict[str, Any]:
    """v1 -> v2: phrase-keyed GCG groundings, frame-keyed masklets and frame_times become lists."""
    gcg = record.get("gcg")
    if gcg and isinstance(gcg.get("groundings"), dict):
        gcg["groundings"] = [
            GCGGrounding(phrase=phrase, tokens_positive=g["token_positives"], object_ids=g.get("object_ids", []),
                         rle_masks=g["rle_masks"])
            for phrase, g in gcg["groundings"].items()
        ]  # fmt: skip
    times = record.get("frame_times")
    if isinstance(times, dict):
        record["frame_times"] = [
            FrameTime(frame_index=int(f), time_s=t)
            for f, t in sorted(times.items(), key=lambda kv: int(kv[0]))
        ]
    frames = [t["frame_index"] for t in record.get("frame_times", [])]
    media = record.get("media", {})
    for track in record.get("tracks", []):
        if isinstance(track.get("masklet"), dict):
            masks = {int(f): rle for f, rle in track["masklet"].items()}
            empty = empty_rle(media["height"], media["width"])
            track["masklet"] = [
                MaskletFrame(frame_index=f, segmentation=masks.get(f, empty)) for f in frames or sorted(masks)
            ]
    record["schema_version"] = SCHEMA_VERSION
    return record


def upgrade_record(record: dict[str, Any]) -> Record:
    """A record of any known schema version as a v2 record (in place); newer versions are refused."""
    version = record.get("schema_version")
    if version == SCHEMA_VERSION:
        return record  # type: ignore[return-value]
    if version == 1:
        return _upgrade_v1(record)  # type: ignore[return-value]
    raise SchemaVersionError(
        f"record {record.get('key')!r} has schema version {version!r}; this groundmill reads versions 1 "
        f"and {SCHEMA_VERSION}: upgrade groundmill to read it"
    )


# ---------------------------------------------------------------------------------------------------------
# Invariants, checked by the sink's tests and by anyone reading shards.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _check_value(value: Any, tp: Any, path: str, problems: list[str]) -> None:
    """Append to `problems` where `value` does not have type `tp` (TypedDicts, lists, dicts, unions,
    scalars; `Any` accepts anything). A TypedDict must have its required keys and no unknown key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return
    if origin in (typing.Union, types.UnionType):
        if not any(not _type_problems(value, arm) for arm in typing.get_args(tp)):
            problems.append(
                f"{path}: {value!r:.60} is none of {[_type_name(a) for a in typing.get_args(tp)]}"
            )
        return
    if tp is type(None):
        if value is not None:
            problems.append(f"{path}: expected null, got {type(value).__name__}")
        return
    if typing.is_typeddict(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected {tp.__name__} (an object), got {type(value).__name__}")
            return
        hints = typing.get_type_hints(tp)
        missing = sorted(_required_keys(tp) - value.keys())
        unknown = sorted(value.keys() - hints.keys())
        if missing:
            problems.append(f"{path}: {tp.__name__} lacks {missing}")
        if unknown:
            problems.append(f"{path}: {tp.__name__} has unknown keys {unknown}")
        for k in value.keys() & hints.keys():
            _check_value(value[k], hints[k], f"{path}.{k}", problems)
        return
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        (item,) = typing.get_args(tp)
        for i, v in enumerate(value):
            _check_value(v, item, f"{path}[{i}]", problems)
        return
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object, got {type(value).__name__}")
            return
        _, item = typing.get_args(tp)
        for k, v in value.items():
            _check_value(v, item, f"{path}.{k}", problems)
        return
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        problems.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__}")


@functools.cache
def _required_keys(tp: Any) -> frozenset[str]:
    """A TypedDict's required keys. Under `from __future__ import annotations` Python 3.11 counts
    `NotRequired[...]` keys of a total TypedDict as required, so they are found here by their hint."""
    hints = typing.get_type_hints(tp, include_extras=True)
    optional = {k for k, hint in hints.items() if typing.get_origin(hint) is NotRequired}
    return frozenset(tp.__required_keys__ - optional)


def _type_problems(value: Any, tp: Any) -> list[str]:
    problems: list[str] = []
    _check_value(value, tp, "", problems)
    return problems


def check_shape(record: dict[str, Any]) -> list[str]:
    """Where a record departs from the :class:`Record` TypedDict and its nested shapes."""
    problems: list[str] = []
    _check_value(record, Record, "record", problems)
    return problems


def _check_frame(f: int, frame: FrameRecord, media: Media) -> list[str]:
    """Mask sizes, exact phrase spans, floating attribute boxes inside the image and naming an attribute."""
    problems: list[str] = []
    size = [media["height"], media["width"]]
    for group in ("objects", "floating_objects", "stuff"):
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
    return problems


def _check_gcg(gcg: GCG, size: list[int]) -> list[str]:
    problems = []
    for g in gcg["groundings"]:
        s, e = g["tokens_positive"]
        if gcg["caption"][s:e] != g["phrase"]:
            problems.append(f"gcg: span {s}:{e} is {gcg['caption'][s:e]!r}, not {g['phrase']!r}")
        if not g["rle_masks"] or any(list(m["size"]) != size for m in g["rle_masks"]):
            problems.append(f"gcg: phrase {g['phrase']!r} has no mask, or one of another size")
    return problems


def _check_tracks(record: Record, size: list[int]) -> list[str]:
    problems = []
    frames = [t["frame_index"] for t in record.get("frame_times", [])]
    for track in record.get("tracks", []):
        tid = track["track_id"]
        if [m["frame_index"] for m in track["masklet"]] != frames:
            problems.append(f"track {tid}: masklet frames are not the {len(frames)} frames of frame_times")
        for m in track["masklet"]:
            if list(m["segmentation"]["size"]) != size:
                problems.append(
                    f"track {tid} frame {m['frame_index']}: mask size {m['segmentation']['size']}"
                )
    return problems


def check_record(record: Record) -> list[str]:
    """Problems with a record (empty list if none): its shape against the schema's TypedDicts, then
    mask sizes, exact phrase spans, floating attribute boxes, GCG masks, and masklets that cover exactly
    the sampled frames."""
    problems = check_shape(record)
    if problems:
        return problems
    media = record["media"]
    size = [media["height"], media["width"]]
    for f, frame in enumerate(frame_records(record)):
        problems += _check_frame(f, frame, media)
    if "gcg" in record:
        problems += _check_gcg(record["gcg"], size)
    return problems + _check_tracks(record, size)


# ---------------------------------------------------------------------------------------------------------
# The Parquet index: one row per input.

STATUS_OK = "ok"
STATUS_ERROR = "error"
# The error code of an error row whose stage gave none (issue 16 adds specific machine codes).
ERROR_CODE_UNCLASSIFIED = "unclassified"
# The error of an input whose content duplicates one that failed: "duplicate of <uri>: <its error>".
DUPLICATE_ERROR_PREFIX = "duplicate of "

TIMING = pa.struct([("stage", pa.string()), ("seconds", pa.float64())])
STAT = pa.struct([("name", pa.string()), ("value", pa.float64())])


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
    # Stage failures (the load step's codes above are all about the input itself):
    TIMEOUT = "timeout"  # a model server or a call did not answer in time
    LLM_UNAVAILABLE = "llm_unavailable"  # the LLM backend could not be reached or started
    IO = "io"  # an OS-level I/O error inside a stage (a network file system, a full temp disk)
    OUT_OF_MEMORY = "out_of_memory"  # host or GPU memory ran out for this sample's batch
    LLM_OUTPUT = "llm_output"  # the LLM answered, but with text that failed its checks every attempt


# Codes of failures that say nothing about the input: `groundmill run --retry-errors` re-attempts
# these rows; the others (corrupt, bomb, unsupported_format, ...) fail the same way every time.
TRANSIENT_ERROR_CODES = frozenset(
    {
        ErrorCode.UNREADABLE,
        ErrorCode.TIMEOUT,
        ErrorCode.LLM_UNAVAILABLE,
        ErrorCode.IO,
        ErrorCode.OUT_OF_MEMORY,
    }
)


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
        ("error", pa.string()),  # "stage: reason", free text
        ("error_stage", pa.string()),  # the stage that failed ("load", "tagging", ...)
        ("error_code", pa.string()),  # a machine code for the failure
        ("duplicate_of", pa.string()),  # uri of the input whose sample this one shares
        ("num_objects", pa.int32()),
        ("coverage", pa.float64()),  # share of pixels under objects or stuff (schema.annotate_coverage)
        # Lists of structs, not MAP columns, which Hugging Face `datasets` has no dtype for.
        ("timings", pa.list_(TIMING)),  # seconds per stage for this sample
        ("stats", pa.list_(STAT)),  # per-sample quality figures (verification, ...)
    ]
)
