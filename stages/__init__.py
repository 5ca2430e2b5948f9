"""Stage registry: manifest stage types -> stage classes (imported on first use). `register` adds a
class at runtime (plug-ins, test doubles); the graph ships resolved classes to the Ray workers."""

from __future__ import annotations

import importlib

# name -> "module:Class" under groundmill.stages, or a registered class. Keep heavy imports (torch
# models) inside setup().
REGISTRY: dict[str, str | type] = {
    "tagging": "tagging:ClipTagging",
    "landmark": "landmark:ClipLandmark",
    "detection": "detection:OpenVocabDetection",
    "voting": "voting:BoxVoting",
    "masks": "masks:Sam2Masks",
    "auto_masks": "auto_masks:Sam2AutoMasks",
    "stuff": "stuff:CassStuff",
    "mask_verification": "mask_verification:MaskVerificationStage",
    "exhaustivity": "exhaustivity:Exhaustivity",
    "near_duplicates": "near_duplicates:NearDuplicates",
    "depth": "depth:Depth",
    "attributes": "attributes:ClipAttributes",
    "captions": "captions:ShortCaptions",
    "grounding": "grounding:PhraseGrounding",
    "scene_graph": "scene_graph:SceneGraph",
    "dense_caption": "dense_caption:DenseCaptioning",
    "verification": "verification:Verification",
    "refexp": "refexp:ReferringExpressions",
    "extra_context": "extra_context:ExtraContext",
    "gcg": "gcg:GCGExport",
    "tracking": "tracking:Sam2Tracking",
    "video_expressions": "video_expressions:VideoExpressions",
    "x2sam": "x2sam:X2SamSegmentation",
    "prefer_masks": "prefer_masks:PreferMasks",
}


def stage_class(name: str) -> type:
    try:
        target = REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(sorted(REGISTRY))}") from None
    if isinstance(target, type):
        return target
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"groundmill.stages.{module}"), cls)


def register(name: str, cls: type) -> None:
    """Make `cls` the stage type `name` (a manifest's `type:` or stage key)."""
    REGISTRY[name] = cls
