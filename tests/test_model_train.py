"""The trainer: config validation, loss falls, exact resume, engine-format shards, eval end to end."""

import io
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from groundmill.model import data as data_module
from groundmill.model.bench import TINY
from groundmill.model.config import SourceConfig, load_config
from groundmill.model.data import TaskBatches
from groundmill.model.eval import evaluate
from groundmill.model.mllm import make_processor
from groundmill.model.modeling import SEG, lucas_kanade
from groundmill.model.records import eval_records, mask_at
from groundmill.model.synthetic import COLOURS, SHAPES, write_split
from groundmill.model.tasks import ANSWER, make_samples, semantic_samples
from groundmill.model.tokenizer import build_word_tokenizer, trainer_processor
from groundmill.model.train import build_model, train
from groundmill.model.train import main as train_main
from groundmill.schema import content_key, new_record
from groundmill.shards import ShardWriter
from groundmill.tests.model_fixtures import FAST, engine_like_output, losses, only_tasks

# Small and quick: batches of 4 images / 2 videos of 4 frames.


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_split(root / "train", images=40, videos=8, seed=5)
    write_split(root / "val", images=6, videos=2, seed=6)
    return root


def config(shards, out, *extra):
    return load_config(
        TINY,
        [
            f"out_dir={out}",
            f"data.train=[{{path: {shards / 'train'}}}]",
            f"data.val=[{{path: {shards / 'val'}}}]",
        ]
        + FAST
        + list(extra),
    )


def first_image(shards, size: int) -> tuple[dict, list[np.ndarray]]:
    """The first image record of the training shards and its frames at `size`."""
    return next(
        (r, f) for r, f in eval_records([SourceConfig(path=str(shards / "train"))], size)
        if r["media"]["type"] == "image"
    )  # fmt: skip


def asked(row: dict) -> str:
    """The label a semantic row asks for."""
    return row["question"].removeprefix("please segment ").removesuffix(" .")


@pytest.mark.parametrize("attributes", [False, True])
def test_semantic_rows_ask_for_every_object_carrying_a_label(shards, attributes):
    """LISA's semantic-segmentation rows from engine labels: a shape word's target is every object of that
    shape, whatever its colour; a full name's, every copy of the pair. With `attributes` (the option
    data.semantic_attributes), an attribute alone is asked as well: "red" -> every red object."""
    record, _ = first_image(shards, 32)
    objects = record["objects"]
    names = [set(o["labels"]) | (set(o["attributes"]) if attributes else set()) for o in objects]
    labels = set().union(*names)
    rows = semantic_samples(record, random.Random(0), 32, k=len(labels) + 5, attributes=attributes)
    assert len(rows) == len(labels)  # every label once, none invented
    colours = {asked(r) for r in rows} & {a for o in objects for a in o["attributes"]}
    assert bool(colours) is attributes
    for row in rows:
        label = asked(row)
        expected = np.zeros((32, 32), bool)
        for o, n in zip(objects, names, strict=True):
            if label in n:
                expected |= mask_at(o["segmentation"], 32)
        assert row["task"] == "semantic" and row["answer"] == ANSWER
        np.testing.assert_array_equal(row["masks"][0][0], expected)
    shapes = [r for r in rows if r["question"].split()[2] in SHAPES]
    assert shapes and any(
        len({o["attributes"][0] for o in objects if r["question"].split()[2] in o["labels"]}) > 1
        for r in shapes
    )  # a shape word spans colours: colour alone cannot answer it
    cfg = load_config(TINY, [f"data.train=[{{path: {shards / 'train'}}}]", *FAST, *only_tasks("semantic")])
    batch = next(iter(TaskBatches(cfg, trainer_processor(cfg))))
    assert batch["masks"].shape[0] == batch["input_ids"].shape[0] >= cfg.data.batch_size


def test_non_positive_sizes_are_named():
    with pytest.raises(ValueError, match="data.targets_per_record"):
        load_config(None, ["data.targets_per_record=0"])
    with pytest.raises(ValueError, match="decoder.relate_frames"):
        load_config(None, ["decoder.relate_frames=0"])


def test_referring_rows_share_one_encoded_image(shards, tmp_path):
    only_referring = only_tasks("referring")
    cfg = config(shards, tmp_path, "data.targets_per_record=3", *only_referring)
    tok = trainer_processor(cfg)
    batch = next(iter(TaskBatches(cfg, tok)))
    rows, images = batch["input_ids"].shape[0], batch["frames"].shape[0]
    assert rows >= cfg.data.batch_size and images < rows  # every synthetic image has >= 3 expressions
    assert batch["row_frames"].tolist() == sorted(batch["row_frames"].tolist())  # a record's rows together
    assert batch["masks"].shape[0] == rows
    # Rows on one image ask for different objects.
    first = (batch["row_frames"] == 0).nonzero()[:, 0]
    assert len(first) > 1 and not torch.equal(batch["masks"][first[0]], batch["masks"][first[1]])
    # Sharing is only a saving: each row's masks are those of the row alone in its own batch.
    model = build_model(cfg, tok).eval()
    with torch.no_grad():
        shared = model(batch)["mask_logits"]
        r = int(first[1])
        ids = batch["input_ids"][r : r + 1, : int(batch["attention_mask"][r].sum())]
        pixels = batch["mllm.pixel_values"][r : r + 1]
        alone = model({"frames": batch["frames"][:1], "input_ids": ids, "attention_mask": torch.ones_like(ids),
                       "mllm.pixel_values": pixels})  # fmt: skip
    torch.testing.assert_close(alone["mask_logits"][0], shared[r], atol=1e-4, rtol=1e-4)


def test_semantic_grayscale_asks_attribute_free_labels_of_a_grey_image(shards, tmp_path):
    """data.semantic_grayscale: that share of semantic records is asked in greyscale (PIL's "L", as
    torchvision's RandomGrayscale), and only of labels naming none of the objects' attributes ("circle",
    never "red circle", nor "red" with data.semantic_attributes); the other records keep their colour
    image and may ask a colour alone."""
    with pytest.raises(ValueError, match="data.semantic_grayscale"):
        load_config(None, ["data.semantic_grayscale=1.5"])
    grey = config(shards, tmp_path, "data.semantic_grayscale=0.5", "data.semantic_hue=0",
                  "data.semantic_attributes=true", *only_tasks("semantic")).data  # fmt: skip
    colour_alone = 0
    records = [r for r, _ in eval_records([SourceConfig(path=str(shards / "train"))], 128)][:40]
    frames = {r["key"]: f for r, f in eval_records([SourceConfig(path=str(shards / "train"))], 128)}
    seen = {True: 0, False: 0}
    for record in records:
        if record["media"]["type"] != "image":
            continue
        image = frames[record["key"]]
        rows = make_samples(record, image, "semantic", random.Random(record["key"]), grey, 128)
        is_grey = rows[0]["frames"][0] is not image[0]
        seen[is_grey] += 1
        if not is_grey:
            assert all(r["frames"][0] is image[0] for r in rows)
            colour_alone += sum(asked(r) in COLOURS for r in rows)
            continue
        luma = np.asarray(Image.fromarray(image[0]).convert("L"))
        assert all(np.array_equal(r["frames"][0], np.repeat(luma[..., None], 3, -1)) for r in rows)
        colours = {a for o in record["objects"] for a in o["attributes"]}
        assert rows and not any(colours & set(r["question"].split()) for r in rows)
    assert seen[True] and seen[False] and colour_alone


def test_semantic_hue_asks_attribute_free_labels_of_the_same_shapes_in_other_colours(shards, tmp_path):
    """data.semantic_hue: that share of the attribute-free semantic records is asked with every hue turned
    (torchvision's ColorJitter hue) instead of in greyscale: saturation and value stay, the hue moves."""
    with pytest.raises(ValueError, match="data.semantic_hue"):
        load_config(None, ["data.semantic_hue=-0.1"])
    cfg = config(
        shards, tmp_path, "data.semantic_grayscale=1", "data.semantic_hue=1", *only_tasks("semantic")
    )
    record, image = first_image(shards, 128)
    rows = make_samples(record, image, "semantic", random.Random(0), cfg.data, 128)
    colours = {a for o in record["objects"] for a in o["attributes"]}
    assert rows and not any(colours & set(r["question"].split()) for r in rows)
    before, after = (
        np.asarray(Image.fromarray(f).convert("HSV")).astype(int) for f in (image[0], rows[0]["frames"][0])
    )
    assert np.abs(after[..., 1:] - before[..., 1:]).max() <= 3  # rounding through RGB
    saturated = before[..., 1] > 128
    assert saturated.any() and (after[..., 0] != before[..., 0])[saturated].mean() > 0.9


@pytest.mark.parametrize("grid", [0, 4])
def test_sam2_tokens_carry_the_segmentation_encoder_into_the_vlm(shards, tmp_path, grid):
    """X-SAM's segmentation projector: with a grid, each image's prompt has grid² <sam2> slots filled from
    SAM2's embedding, so the [SEG] state sees SAM2's features; without one, only the VLM's own tower."""
    only_referring = only_tasks("referring")
    cfg = config(shards, tmp_path, f"mllm.sam2_token_grid={grid}", *only_referring)
    tok = trainer_processor(cfg)
    batch = next(iter(TaskBatches(cfg, tok)))
    batch.pop("position")
    slots = (batch["input_ids"] == tok.tokenizer.convert_tokens_to_ids("<sam2>")).sum(1)
    assert slots.tolist() == [grid**2] * len(slots)
    model = build_model(cfg, tok)
    feats = model.encode_frames(batch)[0]
    hidden, _ = model.run_mllm(batch, feats)
    other, _ = model.run_mllm(batch, feats.flip(-1))  # SAM2 sees another image; the VLM's tower does not
    seg = batch["input_ids"] == model.seg_id
    assert torch.allclose(hidden[seg], other[seg]) == (grid == 0)
    if grid:
        hidden[seg].sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.sam2_proj.parameters())


def assert_parts_train(cfg, out, parts: tuple[str, ...]) -> None:
    """Training cfg keeps its losses finite and moves some weight of each of the model's `parts`."""
    ckpt = train(cfg)
    assert np.isfinite(list(losses(out).values())).all()
    trained = load_file(ckpt / "model.safetensors")
    fresh = build_model(cfg, trainer_processor(cfg)).state_dict()
    for part in parts:
        keys = [k for k in trained if k.startswith(part)]
        assert keys and any(not torch.equal(trained[k], fresh[k]) for k in keys), part


def test_pixel_relations_and_seg_pixel_logits_train_on_images_and_videos(shards, tmp_path):
    """decoder.relate_layers: the conditioned pixels attend to each other, positions in the values (the
    identity at init, so the decoder starts as SAM2's), a clip longer than decoder.relate_frames in
    interleaved windows that each span it (clip_windows); decoder.seg_pixel: the [SEG]-pixel dot product
    joins SAM2's mask logits. Both train, on image rows and on video clips."""
    cfg = config(shards, tmp_path, "decoder.relate_layers=1", "decoder.relate_frames=2", "decoder.seg_pixel=true",
                 "optim.max_steps=3", *only_tasks("referring", "video_referring"))  # fmt: skip
    model = build_model(cfg, trainer_processor(cfg))
    x = torch.randn(2, 3, model.vision.dim, 8, 8)  # 3 frames: windows [0, 2] and [1]
    torch.testing.assert_close(model.relate(x, model.pe()), x)
    for block in model.relate.layers.layers:  # as after training: a pixel now reads the others
        torch.nn.init.normal_(block.self_attn.out_proj.weight, std=0.1)

    def corner_sees(frame: int) -> bool:
        """Does pixel (0, 0) of frame 0 change when the far corner of `frame` does?"""
        far = x.clone()
        far[:, frame, :, -1, -1] += torch.randn(model.vision.dim)  # not a constant: LayerNorm would remove it
        y, y_far = model.relate(x, model.pe()), model.relate(far, model.pe())
        return not torch.allclose(y[:, 0, :, 0, 0], y_far[:, 0, :, 0, 0])

    assert corner_sees(0) and corner_sees(2) and not corner_sees(1)
    seg = torch.randn(2, model.vision.dim)
    logits = model.seg_pixel(x[:, 0], seg, (32, 32))
    assert logits.shape == (2, 1, 32, 32) and not torch.allclose(
        logits, model.seg_pixel(x[:, 0], -seg, (32, 32))
    )
    assert_parts_train(cfg, tmp_path, ("relate.", "seg_pixel."))


def test_word_pixel_scores_are_the_pooled_words_before_the_seg(shards, tmp_path):
    """decoder.word_pixel: each [SEG] pools the input embeddings of the text tokens before it in its row
    (never the answer after it, another row's words or an image slot), and the pixel scores are linear in
    that pooled vector, so a phrase scores as the weighted sum of its words' scores. It trains on clips,
    beside decoder.motion."""
    cfg = config(shards, tmp_path, "decoder.word_pixel=true", "decoder.motion=true",
                 "optim.max_steps=3", *only_tasks("video_referring"))  # fmt: skip
    processor = trainer_processor(cfg)
    model = build_model(cfg, processor).eval()
    tok = processor.tokenizer
    rows = [
        f"please segment the red circle . it is {SEG} . the blue square",
        f"please segment triangle . it is {SEG} .",
    ]
    enc = tok(rows, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    batch = {"input_ids": ids, "attention_mask": mask}
    seg_pos = ids == model.seg_id
    hidden = torch.randn(*ids.shape, model.mllm.config.get_text_config().hidden_size)
    owner = seg_pos.nonzero()[:, 0]

    def seg_words(batch, hidden):
        return model.word_pixel.pool(hidden[seg_pos], hidden[owner], *model.seg_text(batch, seg_pos))

    pooled = seg_words(batch, hidden)
    assert pooled.shape == (2, model.vision.dim)
    after = seg_pos.int().argmax(1)[0] + 2  # a word after row 0's [SEG]: its answer, not its phrase
    changed = hidden.clone()
    changed[0, after] += 1.0
    changed[1] += 1.0  # every state of the other row
    torch.testing.assert_close(seg_words(batch, changed)[0], pooled[0])
    swapped = ids.clone()
    swapped[0, 3] = tok.convert_tokens_to_ids("green")  # "red" -> "green", a word before the [SEG]
    assert not torch.allclose(seg_words({**batch, "input_ids": swapped}, hidden)[0], pooled[0])
    feats = torch.randn(2, 3, model.vision.dim, 8, 8)
    a, b = torch.randn(2, 2, model.vision.dim).unbind(0)
    torch.testing.assert_close(
        model.word_pixel(feats, a + 2 * b), model.word_pixel(feats, a) + 2 * model.word_pixel(feats, b)
    )
    assert_parts_train(cfg, tmp_path, ("word_pixel.", "motion."))


def test_frame_motion_tells_which_way_a_clip_moves(shards, tmp_path):
    """decoder.motion: an image and a still clip pass unchanged (no biases, zero-init output); once trained,
    a clip and the same clip played backwards (the same frames, the opposite motion) get different features
    on the same frame."""
    cfg = config(shards, tmp_path, "decoder.motion=true")
    model = build_model(cfg, trainer_processor(cfg))
    torch.nn.init.normal_(model.motion.diff[-1].weight, std=0.1)  # as after training
    image = torch.randn(2, 1, model.vision.dim, 8, 8)
    still = image.expand(-1, 4, -1, -1, -1)
    torch.testing.assert_close(model.motion(image), image)
    torch.testing.assert_close(model.motion(still), still)
    clip = torch.randn(2, 5, model.vision.dim, 8, 8)
    forwards, backwards = model.motion(clip), model.motion(clip.flip(1)).flip(1)
    assert not torch.allclose(forwards[:, 2], backwards[:, 2])


def test_frame_motion_compares_frames_at_the_training_clips_stride(shards, tmp_path):
    """A clip longer than decoder.relate_frames is seen as training clips are (frames spread over the
    video): FrameMotion compares frames at the stride of clip_windows, so frame 2 of 8 (window 4, stride 2)
    reads frames 0 and 4, not its direct neighbours."""
    cfg = config(shards, tmp_path, "decoder.motion=true", "decoder.relate_frames=4")
    model = build_model(cfg, trainer_processor(cfg))
    torch.nn.init.normal_(model.motion.diff[-1].weight, std=0.1)  # as after training
    clip = torch.randn(2, 8, model.vision.dim, 8, 8)
    for frame, read in ((1, False), (3, False), (0, True), (4, True)):
        changed = clip.clone()
        changed[:, frame] += 1.0
        assert torch.equal(model.motion(changed)[:, 2], model.motion(clip)[:, 2]) is not read, frame


def moving(texture: torch.Tensor, steps: int, dx: int, dy: int) -> torch.Tensor:
    """(1,T,3,S,S) uint8: the (3,S,S) texture shifted by (dx, dy) pixels a frame, wrapping round."""
    frames = [texture.roll((k * dy, k * dx), dims=(-2, -1)) for k in range(steps)]
    return torch.stack(frames)[None].round().clamp(0, 255).to(torch.uint8)


def test_lucas_kanade_measures_a_shift_and_compares_frames_at_the_windows_stride():
    """Lucas-Kanade flow of a smooth texture moving 4 px a frame at 128 px is about 1 px a frame on the
    32 px grid it is measured on (4 x 4 pixels a cell), along the motion and not across it, for either
    axis and backwards; a single frame has none; frame 2 of 8 (window 4, stride 2) compares frames 0 and
    4."""
    gen = torch.Generator().manual_seed(0)
    texture = F.interpolate(torch.rand(1, 3, 16, 16, generator=gen) * 255, size=128, mode="bicubic")[0]
    for dx, dy in ((4, 0), (0, 4), (-4, 0)):
        flow = lucas_kanade(moving(texture, 4, dx, dy), (8, 8), 4)[0]
        u, v = flow[:, 0].median().item(), flow[:, 1].median().item()
        along, across = (u, v) if dx else (v, u)
        # The blur's linearisation underestimates a little: 1 px reads as ~0.75.
        assert 0.6 < along / ((dx or dy) / 4) < 1.1 and abs(across) < 0.1, (dx, dy, u, v)
    assert torch.equal(lucas_kanade(moving(texture, 1, 4, 0), (8, 8), 4), torch.zeros(1, 1, 2, 8, 8))
    clip = moving(texture, 8, 4, 0)
    for frame, read in ((1, False), (3, False), (0, True), (4, True)):
        changed = clip.clone()
        changed[:, frame] = 255 - changed[:, frame]
        unchanged = torch.equal(lucas_kanade(changed, (8, 8), 4)[:, 2], lucas_kanade(clip, (8, 8), 4)[:, 2])
        assert unchanged is not read, frame


def test_frame_flow_and_word_geometry_are_the_same_for_any_colour_and_train(shards, tmp_path):
    """decoder.flow: images and still clips pass unchanged (no biases, zero-init output); a red disc and a
    blue one moving alike on grey get the same flow feature (to 10%), and the opposite motion another.
    decoder.word_geometry: a [SEG]'s words score each pixel's flow and place by their summed learnt
    weights, the words it reads only. Both train on clips."""
    cfg = config(shards, tmp_path, "decoder.flow=true", "decoder.word_geometry=true", "optim.max_steps=3",
                 *only_tasks("video_referring"))  # fmt: skip
    model = build_model(cfg, trainer_processor(cfg))
    torch.nn.init.normal_(model.flow.embed[-1].weight, std=0.1)  # as after training
    dim = model.vision.dim
    image = torch.randn(1, 1, dim, 8, 8)
    torch.testing.assert_close(model.flow(image, torch.zeros(1, 1, 3, 128, 128, dtype=torch.uint8))[0], image)
    still = torch.randn(1, 1, dim, 8, 8).expand(-1, 4, -1, -1, -1)
    torch.testing.assert_close(
        model.flow(still, torch.full((1, 4, 3, 128, 128), 90, dtype=torch.uint8))[0], still
    )
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    disc = ((xx - 64) ** 2 + (yy - 64) ** 2 <= 20**2).float()

    def disc_flow(colour: str, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow feature and the flow over the cells of a `colour` disc on grey moving dx pixels a frame."""
        texture = 90 + disc * (torch.tensor(COLOURS[colour], dtype=torch.float)[:, None, None] - 90)
        frames = moving(F.avg_pool2d(texture[None], 5, 1, 2)[0], 4, dx, 0)  # soft edges, as rendered
        feature, flow = model.flow(torch.zeros(1, 4, dim, 8, 8), frames)
        return feature[0, :, :, 2:6, 2:6], flow

    (red, right), (blue, _), (back, left) = disc_flow("red", 4), disc_flow("blue", 4), disc_flow("red", -4)
    assert (red - blue).norm() < 0.1 * red.norm()
    assert (red - back).norm() > red.norm()
    # decoder.word_geometry: a word weighing the flow's u by -1 scores the disc moving left above zero and
    # the one moving right below; a word weighing x by -1 ("leftmost") leans every frame's scores left.
    # The words not read (the mask) add nothing.
    hidden = model.mllm.config.get_text_config().hidden_size
    words = torch.linalg.qr(torch.randn(hidden, 3))[0].T[None]  # three orthonormal word embeddings
    weights = model.geometry.weights.weight.data  # (4, H): x, y, u, v
    weights[2], weights[0] = -words[0, 0], -words[0, 1]  # word 0 -> u weight -1, word 1 -> x weight -1
    moving_word = torch.tensor([[True, False, False]])
    assert model.geometry((words, moving_word), (8, 8), left)[0, :, 2:6, 2:6].mean() > 0.1
    assert model.geometry((words, moving_word), (8, 8), right)[0, :, 2:6, 2:6].mean() < -0.1
    others = torch.cat([words[:, :1], torch.randn(1, 2, hidden)], 1)
    torch.testing.assert_close(
        model.geometry((others, moving_word), (8, 8), left), -left[:, :, 0], atol=1e-4, rtol=1e-4
    )
    place_word = torch.tensor([[False, True, False]])
    leftmost = model.geometry((words, place_word), (8, 8), None)  # an image: no flow
    x = torch.linspace(-1, 1, 8)
    torch.testing.assert_close(leftmost, -x.expand(1, 1, 8, 8), atol=1e-4, rtol=1e-4)
    assert_parts_train(cfg, tmp_path, ("flow.", "geometry."))


def test_word_vocabulary_spans_every_shard(shards, tmp_path):
    """The tiny LLM's word vocabulary comes from records spread over the shards: with fewer records than
    the image shard holds, the video expressions' words ("moving up") are still known, not [UNK] (read in
    order, the first records are all images, and "moving up" and "moving down" were the same text)."""
    cfg = config(shards, tmp_path, "data.tokenizer_records=20")
    tok = trainer_processor(cfg).tokenizer
    videos = [r for r, _ in eval_records(cfg.data.train, 64) if r["media"]["type"] == "video"]
    words = {w for r in videos for e in r["expressions"] for w in e["video_level"].split()}
    assert {"moving", "left", "right", "up", "down"} <= words
    assert tok.unk_token_id not in tok(sorted(words), is_split_into_words=True)["input_ids"]


def test_generation_never_emits_a_slot_token(shards, tmp_path):
    """A generated <image>, <sam2>, <frame> or <region> would ask the VLM for features nobody gave it."""
    cfg = config(shards, tmp_path, "mllm.sam2_token_grid=2")
    tok = trainer_processor(cfg)
    model = build_model(cfg, tok).eval()
    slots = [model.mllm.config.image_token_id, model.sam2_id, model.frame_id, model.region_id]
    favour = model.mllm.lm_head.register_forward_hook(lambda m, i, out: out.index_add(
        -1, torch.tensor(slots), torch.full((*out.shape[:-1], len(slots)), 1e4)))  # fmt: skip
    frame = np.zeros((128, 128, 3), np.uint8)
    row = {
        "question": "please give a grounded caption of the image .",
        "answer": "",
        "frames": [frame],
        "masks": [],
    }
    batch = data_module.collate([row], tok, model.slots)
    ids = model.generate(batch, max_new_tokens=4, eos_id=-1)
    favour.remove()
    new = ids[0, batch["input_ids"].shape[1] :].tolist()
    assert len(new) == 4 and not set(new) & set(slots)


def test_sources_without_usable_annotations_fail_with_the_reason(tmp_path, monkeypatch):
    # Records with no objects, expressions or tracks (random-weight detectors find nothing, say).
    w = ShardWriter(tmp_path / "bare", name="bare-00000")
    for i in range(3):
        data = png_bytes(i)
        key = content_key(data)
        rec = new_record(key, {"uri": f"{i}.png", "sha256": key, "bytes": len(data), "format": "png"},
                         {"type": "image", "ext": "png", "width": 64, "height": 64}, [])  # fmt: skip
        w.add_sample(key, data, "png", rec, {"uri": f"{i}.png", "status": "ok", "media_type": "image"})
    w.commit()
    monkeypatch.setattr(data_module, "MAX_BARREN_RECORDS", 20)
    cfg = load_config(TINY, [f"out_dir={tmp_path / 'run'}", f"data.train=[{{path: {tmp_path / 'bare'}}}]"])
    with pytest.raises(ValueError, match="gave no sample"):
        next(iter(TaskBatches(cfg, make_processor(cfg.mllm, build_word_tokenizer([])))))


def png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


def test_unknown_config_key_is_named():
    with pytest.raises(Exception, match="lrr"):
        load_config(None, ["optim.lrr=1"])


def test_loss_falls(shards, tmp_path):
    train(
        config(
            shards,
            tmp_path,
            "optim.max_steps=30",
            "optim.lr=2e-3",
            *only_tasks("referring", "video_referring"),
        )
    )
    log = losses(tmp_path)
    first, last = np.mean([log[s] for s in range(1, 6)]), np.mean([log[s] for s in range(26, 31)])
    assert last < 0.7 * first


def test_resume_gives_the_same_next_step_loss(shards, tmp_path, monkeypatch):
    extra = ["optim.max_steps=4", "ckpt_every=2"]
    reads = []
    rows = TaskBatches.rows
    monkeypatch.setattr(TaskBatches, "rows", lambda self, *a: reads.append(a) or rows(self, *a))
    train(config(shards, tmp_path / "full", *extra))
    full_reads, reads[:] = list(reads), []
    resumed = tmp_path / "resumed"
    ckpt = tmp_path / "full" / "checkpoints" / "step-0000002"
    train_main(
        [str(ckpt / "config.yaml"), "--resume", str(ckpt), f"out_dir={resumed}"]
    )  # overrides may follow
    full, again = losses(tmp_path / "full"), losses(resumed)
    assert set(again) == {3, 4}
    assert again[3] == full[3] and again[4] == full[4]
    # From the stored position: the records of steps 1-2 are not read again (only buffered ones).
    assert set(reads) < set(full_reads) and len(reads) < len(full_reads) * 3 / 4


def test_trainer_reads_engine_shards(tmp_path):
    engine_like_output(tmp_path / "engine")
    cfg = load_config(
        TINY,
        [
            f"out_dir={tmp_path / 'run'}",
            f"data.train=[{{path: {tmp_path / 'engine'}}}]",
            *FAST,
            "data.batch_size=2",
            "data.video_batch_size=1",
            "optim.max_steps=3",
        ],  # fmt: skip
    )
    processor = trainer_processor(cfg)
    tok = processor.tokenizer
    assert tok.tokenize("the frisbee in the air") == ["the", "frisbee", "in", "the", "air"]
    seen = set()
    for batch, _ in zip(TaskBatches(cfg, processor), range(12), strict=False):
        assert batch["frames"].shape[-2:] == (128, 128)
        assert batch["masks"].shape[0] == (batch["input_ids"] == tok.convert_tokens_to_ids("[SEG]")).sum()
        seen.add(batch["frames"].shape[1])
    assert seen == {1, 4}  # image and video batches
    train(cfg)
    assert (tmp_path / "run" / "checkpoints" / "step-0000003" / "model.safetensors").exists()


def test_eval_reports_every_task(shards, tmp_path):
    ckpt = train(config(shards, tmp_path, "optim.max_steps=2"))
    results = evaluate(config(shards, tmp_path), ckpt, gcg_limit=2)
    for task in ("referring", "interactive", "vgd", "gcg", "video_referring", "video_object"):
        assert task in results
    assert 0 <= results["referring"]["cIoU"] <= 1 and 0 <= results["video_referring"]["J&F"] <= 1
    assert {"AP50", "mIoU", "recall"} <= set(results["gcg"])


def test_full_size_manifest_is_a_valid_config():
    cfg = load_config(TINY.parent / "train_x2sam.yaml")
    assert cfg.vision.checkpoint == "facebook/sam2.1-hiera-large" and cfg.mllm.lora and cfg.freeze_vision
    assert (cfg.loss.ce, cfg.loss.bce, cfg.loss.dice) == (1.0, 2.0, 0.5)
