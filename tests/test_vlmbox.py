"""vlmbox.py and the refiner's switches: the VLM's box answers parsed in each family's format (and the fallbacks),
generated through the same greedy decoding as chat.generate, cached beside the maps (a cached box equals a fresh
one; training from the cache never generates and never runs SAM's image encoder); detach_mask stops the refined
loss at the dense prompt; the cache records SAM by its weights; the selector trains from a cache."""
import dataclasses
import json

import pytest
import torch
from PIL import Image

import build
import cache
import cached
import chat
import head as heads
import qwen_inputs
import refiner
import train
import vlmbox
from test_cache import SHARD, cache_config, synthetic_root  # noqa: F401 (a fixture)

HIDDEN, LAYERS = 128, 4


# ------------------------------------------------------------------------------------------------ parsing

QWEN25 = ('```json\n[\n\t{"bbox_2d": [135, 114, 1016, 672], "label": "the man on the left"}\n]\n```')  # cookbook
QWEN3 = '```json\n[\n\t{"bbox_2d": [120, 230, 560, 780], "label": "dog"}\n]\n```'
QWEN2 = "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(536,509),(588,602)<|box_end|>"


@pytest.mark.parametrize("text, family, seen, box, outcome", [
    (QWEN25, "qwen2_5_vl", (700, 1064), (135 / 1064, 114 / 700, 1016 / 1064, 672 / 700), "ok"),
    (QWEN3, "qwen3_vl", (700, 1064), (0.12, 0.23, 0.56, 0.78), "ok"),  # 0..1000 whatever the size
    (QWEN3, "qwen3_vl_moe", (70, 64), (0.12, 0.23, 0.56, 0.78), "ok"),
    (QWEN2, "qwen2_vl", (700, 1064), (0.536, 0.509, 0.588, 0.602), "ok"),
    ("The box is (536, 509), (588, 602).", "qwen2_vl", (1, 1), (0.536, 0.509, 0.588, 0.602), "ok"),  # no tokens
    ('{"bbox_2d": [10, 20, 30, 40], "label": "a"}', "qwen2_5_vl", (100, 200), (0.05, 0.2, 0.15, 0.4), "ok"),
    ('Sure! ```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "cat"}, {"bbox_2d": [50, 60, 70, 80], "label": "cat"}]'
     '\n```', "qwen2_5_vl", (100, 200), (0.05, 0.2, 0.15, 0.4), "several"),  # the first of several
    ('[{"bbox_2d": [-5, 10, 250, 50]}]', "qwen2_5_vl", (100, 200), (0.0, 0.1, 1.0, 0.5), "clipped"),
    ('[{"bbox_2d": [300, 10, 400, 50]}]', "qwen2_5_vl", (100, 200), None, "empty"),  # outside the image
    ('[{"bbox_2d": [30, 10, 20, 50]}]', "qwen3_vl", (100, 200), None, "empty"),  # corners swapped
    ('[{"bbox_2d": [1, 2, 3]}]', "qwen2_5_vl", (100, 200), None, "malformed"),
    ('[{"bbox_2d": [1, 2, 3, "4"]}]', "qwen2_5_vl", (100, 200), None, "malformed"),
    ('```json\n[\n\t{"bbox_2d": [135, 114, 10', "qwen2_5_vl", (100, 200), None, "no box"),  # cut by max_new_tokens
    ("I cannot see that object in the image.", "qwen3_vl", (100, 200), None, "no box"),
    ('[{"point_2d": [12, 40], "label": "cat"}]', "qwen3_vl", (100, 200), None, "no box"),
    ("", "qwen2_vl", (100, 200), None, "no box"),
])
def test_parse_box_reads_each_familys_format(text, family, seen, box, outcome):
    got, why = vlmbox.parse_box(text, family, seen)
    assert why == outcome
    assert got == (pytest.approx(box) if box is not None else None)


def test_parse_box_refuses_an_unknown_family():
    with pytest.raises(ValueError, match="llava"):
        vlmbox.parse_box(QWEN3, "llava", (10, 10))


def test_the_question_is_the_familys():
    assert vlmbox.question("the dog", "qwen2_5_vl") == ("Locate the dog in the image, output its bbox coordinates "
                                                         "in JSON format.")
    assert "<|object_ref_start|>the dog<|object_ref_end|>" in vlmbox.question("the dog", "qwen2_vl")


def test_sam_boxes_map_fractions_to_the_sam_frame_and_fall_back_to_the_mask_box():
    coarse = [torch.full((12, 16), -4.0) for _ in range(3)]
    coarse[1][3:7, 4:10] = 2.0
    vlmbox.COUNTS.clear()
    boxes = vlmbox.sam_boxes([[(0.25, 0.5, 0.75, 1.0)], [None, (0.0, 0.0, 1.0, 0.5)]], coarse, [0, 1, 1],
                             [(192, 256), (150, 200)])
    assert boxes.tolist() == [[64, 96, 192, 192], refiner.box_of(coarse[1], (150, 200)).tolist(), [0, 0, 200, 75]]
    assert vlmbox.COUNTS["fallback"] == 1 and vlmbox.COUNTS["vlm"] == 2
    assert "1 fell back" in vlmbox.report()
    with pytest.raises(ValueError, match="2 boxes for 3 phrases"):
        vlmbox.sam_boxes([[None], [None]], coarse, [0, 1, 1], [(192, 256), (150, 200)])


# ------------------------------------------------------------------------------------------------ generation

def test_generation_equals_chat_generate_and_boxes_come_per_phrase(tiny_qwen):
    """vlm_boxes asks each phrase of a batch (one sequence of two phrases, one of one) from the batch's own pixels;
    the answers equal chat.generate's on the PIL images (the tiny random VLM answers garbage: no box)."""
    _, qwen, tokenizer = tiny_qwen
    images = [Image.new("RGB", (84, 56), (200, 30, 30)), Image.new("RGB", (56, 112), (30, 30, 200))]
    phrases = [["the red circle", "a big blue square"], ["the yellow star"]]
    samples = []
    for image, p in zip(images, phrases):
        pixel_values, grid = qwen_inputs.patchify(image, **tokenizer.image_settings)
        samples.append(dict(qwen_inputs.build_inputs(tokenizer, grid, p), pixel_values=pixel_values,
                            image_grid_thw=grid, phrases=p))
    batch = qwen_inputs.collate(samples)
    answers = []
    real = vlmbox.generate

    def spy(*args, **kwargs):
        answers.extend(real(*args, **kwargs))
        return answers[-len(args[2]):]
    vlmbox.generate = spy
    try:
        boxes = vlmbox.vlm_boxes(qwen, batch, max_new_tokens=6)
    finally:
        vlmbox.generate = real
    assert [len(b) for b in boxes] == [2, 1]
    questions = [vlmbox.question(p, "qwen2_5_vl") for ps in phrases for p in ps]
    expect = chat.generate(qwen, tokenizer, [images[0], images[0], images[1]], questions, tokenizer.image_settings,
                           max_new_tokens=6)
    assert [a.replace("<|im_end|>", "").strip() for a in answers] == expect  # no special tokens in random answers


# ------------------------------------------------------------------------------------------------ cache

def fake_answer(qwen, tokenizer, prompts, max_new_tokens=vlmbox.MAX_NEW_TOKENS):
    """A deterministic 'VLM' answer per prompt: a Qwen2.5-VL JSON box that depends on the question's tokens."""
    out = []
    for ids, _, _, grid in prompts:
        n = int(ids.sum()) % 97
        out.append(f'```json\n[{{"bbox_2d": [{n % 40}, 3, {n % 40 + 50}, {n % 13 + 40}], "label": "x"}}]\n```'
                   if n % 5 else "no idea")  # a fifth without a box: the fallback is cached too
    return out


def boxes(vlm_box):
    """Per sequence its phrases' boxes as tuples (JSON reads them back as lists)."""
    return [[None if box is None else tuple(box) for box in sequence] for sequence in vlm_box]


def test_a_cached_box_equals_a_fresh_one_and_training_never_generates(tiny_qwen, synthetic_root, tmp_path,  # noqa
                                                                      monkeypatch):
    _, qwen, tokenizer = tiny_qwen
    cfg = cache_config(tiny_qwen[0], synthetic_root, tmp_path, refiner=dict(sam="tiny", box="vlm"),
                       synthetic=dict(root=synthetic_root), max_steps=2, vis_samples=0)
    monkeypatch.setattr(vlmbox, "generate", fake_answer)
    build.prepare_sam(cfg)
    cache.extract_all(cfg, shard_size=SHARD)
    grounder = build.build_grounder(build.grounder_kwargs(cfg, qwen.config))
    assert grounder.refiner.box == "vlm"
    unpacked = dataclasses.replace(cfg, pack_tokens=0)  # extracted packed; compared one sequence per sentence
    (online, _), = build.build_val_loaders(unpacked, tokenizer, cfg.val_data, build.sam_settings(grounder)).values()
    (from_cache, _), = cached.build_val_loaders(cfg, cfg.val_data).values()
    seen = []
    for a, b in zip(online, from_cache, strict=True):
        fresh = build.extract(qwen, grounder, a)["vlm_box"]
        assert boxes(b["frozen"]["vlm_box"]) == boxes(fresh)  # exactly: JSON keeps every float's bits
        seen += [box for sequence in fresh for box in sequence]
    assert None in seen and len({box for box in seen if box}) > 1

    def no_generation(*args, **kwargs):
        raise AssertionError("training from a cache generated")
    monkeypatch.setattr(vlmbox, "generate", no_generation)
    monkeypatch.setattr(refiner.Refiner, "image_embeddings", no_generation)
    metrics, trained = train.train(cfg, torch.device("cpu"))
    assert trained.refiner.vision_encoder is None and trained.refiner.box == "vlm"
    assert metrics["synthetic_val"]["n"] == 36


def test_training_from_a_cache_never_runs_the_image_encoder(tiny_qwen, synthetic_root, tmp_path, monkeypatch):  # noqa
    """SAM's image encoder is never called from a cache (its forward raises here) and the refiner holds none."""
    cfg = cache_config(tiny_qwen[0], synthetic_root, tmp_path, refiner=dict(sam="tiny"),
                       synthetic=dict(root=synthetic_root), max_steps=2, vis_samples=0, val_data=[])
    build.prepare_sam(cfg)
    cache.extract_all(cfg, shard_size=SHARD)
    from transformers.models.sam import modeling_sam

    def called(*args, **kwargs):
        raise AssertionError("SAM's image encoder ran while training from a cache")
    monkeypatch.setattr(modeling_sam.SamVisionEncoder, "forward", called)
    _, grounder = train.train(cfg, torch.device("cpu"))
    assert grounder.refiner.vision_encoder is None and grounder.frozen_parameters() == []
    with pytest.raises(RuntimeError, match="without SAM's image encoder"):
        grounder.refiner.image_embeddings(torch.zeros(1, 3, 256, 256))


def test_the_cache_records_sam_by_its_weights(tiny_qwen, synthetic_root, tmp_path):  # noqa: F811
    a = refiner.build_tiny_sam(str(tmp_path / "a"), seed=0)
    b = refiner.build_tiny_sam(str(tmp_path / "b"), seed=1)
    c = refiner.build_tiny_sam(str(tmp_path / "c"), seed=0)
    assert build.sam_sha1(a) == build.sam_sha1(c) != build.sam_sha1(b)

    def meta(**refine):
        return cache.frozen_meta(cache_config(tiny_qwen[0], synthetic_root, tmp_path, refiner=refine))["refiner"]
    assert meta(sam=a) == dict(sam=a, sam_sha1=build.sam_sha1(a))
    assert meta(sam=a, detach_mask=True) == meta(sam=a) == meta(sam=a, box="mask")  # training-only switches
    assert meta(sam=a, box="vlm") != meta(sam=a)
    with pytest.raises(SystemExit, match="box"):
        build.check_refiner(cache_config(tiny_qwen[0], synthetic_root, tmp_path, refiner=dict(sam=a, box="sam")))


def test_the_selector_trains_from_a_cache(tiny_qwen, synthetic_root, tmp_path):  # noqa: F811
    cfg = cache_config(tiny_qwen[0], synthetic_root, tmp_path, selector=dict(layers=2, width=16), max_steps=3,
                       vis_samples=0)
    cache.extract_all(cfg, shard_size=SHARD)
    read = next(iter(cached.build_train_loader(cfg)))
    assert len(read["frozen"]["answer"]) == len(read["phrases"])  # one per sequence
    online = next(iter(build.build_train_loader(cfg, tiny_qwen[2])))  # the same batch (test_cache checks it)
    assert [t.tolist() for t in heads.answer_tags(read)] == [t.tolist() for t in heads.answer_tags(online)]
    losses = []
    real = heads.losses

    def spy(out, batch):
        terms = real(out, batch)
        losses.append(terms["select"][0].mean().item())
        return terms
    heads.losses, saved = spy, heads.losses
    try:
        train.train(cfg, torch.device("cpu"))
    finally:
        heads.losses = saved
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


# ------------------------------------------------------------------------------------------------ detach

@pytest.mark.parametrize("detach", [False, True])
def test_detach_mask_stops_the_refined_loss_at_the_dense_prompt(tmp_path, detach):
    torch.manual_seed(0)
    sam = refiner.load_sam(refiner.build_tiny_sam(str(tmp_path / "sam")), device="cpu")
    r = refiner.Refiner(sam, hidden_size=HIDDEN, text_layers=LAYERS, detach_mask=detach)
    coarse = [torch.randn(12, 16, requires_grad=True), torch.randn(8, 8, requires_grad=True)]
    embeddings = dict(sam_embeddings=torch.randn(2, 64, 16, 16))  # what image_embeddings gives a SAM
    hidden = [torch.randn(2, LAYERS, HIDDEN), torch.randn(3, LAYERS, HIDDEN)]
    out = r(coarse, embeddings, [0, 1], hidden, [(192, 256), (256, 256)])
    sum(o.sum() for o in out).backward()
    if detach:
        assert all(c.grad is None for c in coarse)  # the U-Net gets nothing from the refined loss
    else:
        assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in coarse)
    assert r.text_proj.weight.grad.abs().sum() > 0  # the refiner itself trains either way


# ------------------------------------------------------------------------------------------------ the demo's table

def test_a_refiner_runs_baselines_include_the_unet_alone(tiny_qwen, synthetic_root, tmp_path, monkeypatch):  # noqa
    """With a refiner, baselines=true also trains the U-Net alone (refiner={}, same steps) and the table shows it;
    the row is what eval.py gives its checkpoint."""
    from test_train import run_eval
    cfg = cache_config(tiny_qwen[0], synthetic_root, tmp_path, refiner=dict(sam="tiny", detach_mask=True),
                       synthetic=dict(root=synthetic_root), max_steps=2, vis_samples=0, baselines=True, cache_dir="")
    train.main(cfg)
    table = json.load(open(tmp_path / "baselines.json"))
    assert set(table) == {f"synthetic_val ({k})" for k in ("ours", "ours, U-Net only", "U-Net alone",
                                                           "constant phrase", "random object")}
    alone = torch.load(tmp_path / "unet_alone" / "ckpt.pt", weights_only=True)
    assert alone["config"]["refiner"] == {} and alone["config"]["constant_phrase"] == "" and alone["step"] == 2
    run_eval(monkeypatch, "--ckpt", str(tmp_path / "unet_alone" / "ckpt.pt"), "--out", str(tmp_path / "m.json"))
    assert json.load(open(tmp_path / "m.json"))["results"]["synthetic_val"] == table["synthetic_val (U-Net alone)"]
