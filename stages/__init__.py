"""Stage registry: manifest stage names -> stage classes (imported on first use)."""

from __future__ import annotations

import importlib

# name -> "module:Class" under groundmill.stages. Keep heavy imports (torch models) inside setup().
REGISTRY: dict[str, str] = {
    "tagging": "tagging:ClipTagging",
    "landmark": "landmark:ClipLandmark",
    "detection": "detection:OpenVocabDetection",
    "voting": "voting:BoxVoting",
    "masks": "masks:Sam2Masks",
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
}


def stage_class(name: str) -> type:
    try:
        target = REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(sorted(REGISTRY))}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"groundmill.stages.{module}"), cls)
