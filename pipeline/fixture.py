"""`groundmill fixture hub DIR`: an offline Hugging Face cache in which every model id of a manifest
resolves, each holding a tiny random-weight model of the class the real checkpoint has.

Each repo gets the real repo's file names and layout (`DIR/models--ORG--NAME/snapshots/<commit>/`
with `refs/main`): `config.json`, the processor and tokenizer files, and `model.safetensors` for
transformers models; `open_clip_config.json` + `open_clip_model.safetensors` for open_clip;
`sam2.1_hiera_large.pt` plus the repo's hydra config for SAM 2; `config.json` + `model.safetensors`
of a patch-8 `ViTModel` for DINO (the stuff stage). The stages then load them by their
hub ids with `HF_HUB_OFFLINE=1 HF_HUB_CACHE=DIR`, through the same code a real run uses. Every
snapshot carries `stages.hub.FIXTURE_MARKER`, so the run record and each record's provenance say
`random_weights: true` for it. The one exception is all-MiniLM-L6-v2: its real weights are installed
from the package registry, so its snapshot is a copy of those and is reported as real.

Tokenizers are real vocabularies available offline, not always the checkpoint's own: CLIP BPE
(OWLv2), bert-base-uncased WordPiece (Grounding DINO), and SmolLM2's byte-level BPE with its ChatML
template in place of OPT's GPT-2 BPE (BLIP-2) and of Qwen's or Llama's (the instruct LLM).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from groundmill.pipeline.config import Config
from groundmill.stages import stage_class
from groundmill.stages.hub import FIXTURE_MARKER, repo_id
from groundmill.stages.models import seeded

Writer = Callable[[str, Path], None]  # (repo id, folder to write the repo's files into)

# Stage types whose model kind does not depend on their params.
_KINDS = {
    "tagging": "open_clip",
    "landmark": "open_clip",
    "attributes": "open_clip",
    "masks": "sam2",
    "auto_masks": "sam2",
    "stuff": "open_clip",
    "tracking": "sam2",
    "depth": "depth",
    "grounding": "sentence_embedder",
}


def manifest_models(cfg: Config) -> dict[str, str]:
    """Every hub repo id the enabled stages of `cfg` load -> the kind of model it is."""
    from groundmill.stages.llm.stage import LLMStage

    found: dict[str, str] = {}
    for name, stage_cfg in cfg.stages.items():
        if not stage_cfg.enabled:
            continue
        kind_name = stage_cfg.type or name
        cls, params = stage_class(kind_name), stage_cfg.params
        models = []
        if kind_name in _KINDS:
            models.append((stage_cfg.model.id, _KINDS[kind_name]))
        elif kind_name == "detection":
            models.append((stage_cfg.model.id, params.detector))
        elif kind_name == "captions" and params.backend == "transformers":
            models.append((stage_cfg.model.id, "image_to_text"))
        if issubclass(cls, LLMStage) and cls(params).uses_llm():
            models.append((stage_cfg.model.id, "causal_lm"))
        if kind_name == "verification":
            models.append((params.embedder, "sentence_embedder"))
        if kind_name == "stuff":
            models.append((params.dino, "dino"))
        if kind_name == "auto_masks":
            models.append((params.clip, "open_clip"))
        for model_id, kind in models:
            if (repo := repo_id(model_id)) is not None:
                found[repo] = kind
    return found


def _save(parts: tuple[Any, ...], folder: Path) -> None:
    """save_pretrained each part; a processor's image processor and tokenizer are saved apart
    (`preprocessor_config.json` + tokenizer files), the layout of the detector repos."""
    for part in parts:
        pieces = [getattr(part, a) for a in ("image_processor", "tokenizer") if hasattr(part, a)]
        for piece in pieces or [part]:
            piece.save_pretrained(folder)


def write_detector(kind: str) -> Writer:
    from groundmill.stages.detection import DETECTORS

    def write(repo: str, folder: Path) -> None:
        seeded(0, repo)
        _save(DETECTORS[kind].tiny(), folder)

    return write


def write_open_clip(repo: str, folder: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    from groundmill.stages.clip import _CONFIG_DIR, TINY_ARCH

    model_cfg = json.loads((_CONFIG_DIR / f"{TINY_ARCH}.json").read_text())
    open_clip.add_model_config(_CONFIG_DIR)
    seeded(0, repo)
    model = open_clip.create_model(TINY_ARCH)
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors")


def write_sam2(repo: str, folder: Path) -> None:
    """sam2's checkpoint file for the repo (`{"model": state_dict}`) and the repo's hydra config,
    here sam2's hiera-t config at the tiny image size."""
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    from groundmill.stages.sam2_models import TINY_CONFIG, TINY_IMAGE_SIZE, image_size_overrides

    config_name, ckpt_name = HF_MODEL_ID_TO_FILENAMES[repo]
    cfg = compose(config_name=TINY_CONFIG, overrides=image_size_overrides(TINY_IMAGE_SIZE))
    OmegaConf.resolve(cfg)
    seeded(0, repo)
    model = instantiate(cfg.model, _recursive_=True)
    (folder / Path(config_name).name).write_text(OmegaConf.to_yaml(cfg))
    torch.save({"model": model.state_dict()}, folder / ckpt_name)


def write_depth(repo: str, folder: Path) -> None:
    from groundmill.stages.depth import _tiny_depth_anything

    _save(_tiny_depth_anything(0), folder)


def write_dino(repo: str, folder: Path) -> None:
    """A DINO ViT (`ViTModel`, patch 8, 2 layers) and the ViT image processor the real repos carry."""
    from transformers import ViTImageProcessor

    from groundmill.stages.cass import IMAGENET_MEAN, IMAGENET_STD, tiny_dino

    _save(
        (tiny_dino(0), ViTImageProcessor(image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))),
        folder,
    )


def _chat_tokenizer() -> Any:
    """SmolLM2's byte-level BPE tokenizer with its ChatML template (installed offline)."""
    from transformers import AutoTokenizer

    from groundmill.stages.llm.hf import SMOLLM2, resolve_checkpoint

    return AutoTokenizer.from_pretrained(resolve_checkpoint(SMOLLM2))


def write_image_to_text(repo: str, folder: Path) -> None:
    """BLIP-2 (`Blip2ForConditionalGeneration`, an OPT decoder) and its `Blip2Processor`."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    from groundmill.stages.captions import TINY_IMAGE_SIZE

    size = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    processor = Blip2Processor(BlipImageProcessor(size=size), _chat_tokenizer(), num_query_tokens=4)
    tokenizer = processor.tokenizer  # the processor added its <image> token
    encoder = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {"model_type": "opt", "vocab_size": len(tokenizer), "hidden_size": 32, "ffn_dim": 64}
    text |= {"num_hidden_layers": 2, "num_attention_heads": 2, "word_embed_proj_dim": 32}
    text |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    text |= {"pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
    config = Blip2Config(
        vision_config=encoder | {"image_size": TINY_IMAGE_SIZE, "patch_size": 16},
        qformer_config=encoder | {"encoder_hidden_size": 32, "vocab_size": 64},
        text_config=text,
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token.content),
    )
    seeded(0, repo)
    model = Blip2ForConditionalGeneration(config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)  # processor_config.json holds num_query_tokens, as in the real repo


def write_causal_lm(repo: str, folder: Path) -> None:
    """A 2-layer decoder of the repo's family (Qwen2 for Qwen ids, Llama otherwise)."""
    from groundmill.stages.llm.hf import tiny_causal_lm

    tokenizer = _chat_tokenizer()
    family = "qwen2" if "qwen" in repo.lower() else "llama"
    seeded(0, repo)
    # Qwen2.5's context length: the stages' long prompts must fit the fixture as they fit the model.
    _save((tiny_causal_lm(tokenizer, family, max_positions=32768), tokenizer), folder)


def write_sentence_embedder(repo: str, folder: Path) -> None:
    """all-MiniLM-L6-v2: the real files installed from the package registry; other ids: a 2-layer BERT."""
    from groundmill.stages.text_embed import tiny_bert
    from groundmill.stages.tokenizers import MINILM_HUB_ID, bert_wordpiece_tokenizer, minilm_dir

    if repo == MINILM_HUB_ID:  # linked, as the hub cache links snapshot files to its blobs
        for path in minilm_dir().rglob("*"):
            if path.is_file():
                (folder / path.relative_to(minilm_dir())).parent.mkdir(parents=True, exist_ok=True)
                (folder / path.relative_to(minilm_dir())).symlink_to(path)
        return
    tokenizer = bert_wordpiece_tokenizer()
    seeded(0, repo)
    _save((tiny_bert(tokenizer), tokenizer), folder)


WRITERS: dict[str, Writer] = {
    "open_clip": write_open_clip,
    "owlv2": write_detector("owlv2"),
    "grounding_dino": write_detector("grounding_dino"),
    "mask2former": write_detector("mask2former"),
    "sam2": write_sam2,
    "depth": write_depth,
    "dino": write_dino,
    "image_to_text": write_image_to_text,
    "causal_lm": write_causal_lm,
    "sentence_embedder": write_sentence_embedder,
}


def _commit_hash(folder: Path) -> str:
    """A 40-hex commit id from the snapshot's contents, so an identical fixture gets the same one."""
    digest = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def write_snapshot(cache: Path, repo: str, write: Writer, marker: dict[str, Any] | None) -> Path:
    """One repo in the cache layout; `marker` (None for real weights) goes into the snapshot as
    FIXTURE_MARKER. A repo already in the cache that is not a fixture is never touched."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    if repo_dir.exists():
        if not any(repo_dir.glob(f"snapshots/*/{FIXTURE_MARKER}")):  # a real download
            if marker is None:  # the real weights are already there
                return repo_dir / "snapshots" / (repo_dir / "refs" / "main").read_text().strip()
            raise FileExistsError(f"{repo_dir} holds a real download of {repo}; not overwriting it")
        shutil.rmtree(repo_dir)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        staged = Path(tmp)
        write(repo, staged)
        if marker is not None:
            (staged / FIXTURE_MARKER).write_text(json.dumps(marker, indent=2))
        commit = _commit_hash(staged)
        (repo_dir / "refs").mkdir(parents=True)
        (repo_dir / "refs" / "main").write_text(commit)
        (repo_dir / "snapshots").mkdir()
        shutil.move(staged, repo_dir / "snapshots" / commit)
        staged.mkdir()  # the temporary directory's cleanup expects it
    return repo_dir / "snapshots" / commit


def write_hub_fixture(cache: str | Path, cfg: Config) -> dict[str, Path]:
    """Write every hub model of `cfg` into the cache `cache`; returns repo id -> snapshot folder."""
    from groundmill.stages.tokenizers import MINILM_HUB_ID

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    written = {}
    for repo, kind in sorted(manifest_models(cfg).items()):
        real = kind == "sentence_embedder" and repo == MINILM_HUB_ID
        marker = (
            None if real else {"random_weights": True, "kind": kind, "written_by": "groundmill fixture hub"}
        )
        written[repo] = write_snapshot(cache, repo, WRITERS[kind], marker)
    return written
