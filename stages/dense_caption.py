"""GranD level 3: a dense caption written by the LLM from the scene graph, as if looking at the image.

All views of a batch are prompted at once. A generation that did not stop on its own (or is
malformed) is regenerated; after `attempts` tries the view gets no caption and the reason is
recorded (`llm_drops`, and `dense_caption.dropped` in the index stats).
"""

from __future__ import annotations

from groundmill.schema import DenseCaption, FrameRecord
from groundmill.stages.base import Sample
from groundmill.stages.llm.stage import Job, ProseStage
from groundmill.stages.scene_graph import render_scene_graph


class DenseCaptioning(ProseStage):
    name = "dense_caption"
    provides = ("dense_caption",)
    requires = ("scene_graph",)
    prompt_name = "dense_caption"

    def prompts_for_frames(self, frames: list[tuple[Sample, FrameRecord]]) -> list[Job]:
        """One prompt per frame whose scene graph has objects (nothing to ground otherwise)."""
        return [
            (sample, frame, self.prompt.render(scene_graph=render_scene_graph(frame["scene_graph"])))
            for sample, frame in frames
            if frame.get("scene_graph", {}).get("objects")
        ]

    def caption(self, jobs: list[Job]) -> None:
        """Write each job's caption, or record why it was dropped."""
        self.run_jobs(
            jobs,
            self.parse,
            lambda frame, text: frame.update(dense_caption=DenseCaption(caption=text, details=[])),
        )

    def process(self, samples: list[Sample]) -> None:
        self.caption(self.prompts_for_frames([(s, v.record) for s in samples for v in s.views()]))
