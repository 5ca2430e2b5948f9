"""GranD level 4: one paragraph of extra context per image (typical use, history, possible dangers),
written by the LLM from the scene category and at most ~30 object names."""

from __future__ import annotations

from dataclasses import dataclass

from groundmill.stages.base import Sample
from groundmill.stages.llm.stage import ProseStage
from groundmill.stages.scene_graph import scene_text


class ExtraContext(ProseStage):
    name = "extra_context"
    provides = ("additional_context",)
    requires = ("scene_graph",)
    prompt_name = "extra_context"

    @dataclass
    class Params(ProseStage.Params):
        max_objects: int = 30  # GranD gives the LLM at most ~30 objects here
        max_sentences: int = 7

    def process(self, samples: list[Sample]) -> None:
        jobs = []
        for sample in samples:
            for view in sample.views():
                graph = view.record.get("scene_graph")
                if not graph or not graph["objects"]:
                    continue
                names = list(dict.fromkeys(o["label"] for o in graph["objects"][: self.params.max_objects]))
                jobs.append(
                    (
                        sample,
                        view.record,
                        self.prompt.render(scene=scene_text(graph), objects=", ".join(names)),
                    )
                )
        self.run_jobs(jobs, self.parse, lambda frame, text: frame.update(additional_context=text))
