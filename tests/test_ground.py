"""ground.py and export.py on the CPU with the tiny model: the API gives eval.py's numbers, batched or not; an export
round-trips to the same masks (ground, eval.py --ckpt DIR); another base VLM is refused; the maps and their picture
(eval.py --maps, tensorboard)."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import build
import draw
import eval as evaluation
import export
import ground
import model
import qwen_inputs
import synthetic
import train
from test_train import run_eval, synthetic_root, tiny_config, trained  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def pictures(n=2):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (60 + 20 * i, 90 - 10 * i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def grounding(trained):
    return ground.load_grounder(trained, device="cpu")


def test_ground_gives_eval_numbers_single_and_batched(grounding, trained, tmp_path):
    g = grounding
    im1, im2 = pictures()
    qwen, grounder, tokenizer, cfg = build.load_run(trained, torch.device("cpu"))
    by_eval = {}  # eval.py --image --text's path, one image and one phrase at a time
    for k, (im, text) in enumerate([(im1, "the red circle"), (im2, "a big blue square"), (im2, "zebra")]):
        by_eval[k] = evaluation.predict_image(qwen, grounder, tokenizer, cfg, im, text, torch.device("cpu"),
                                              str(tmp_path / f"{k}.png")).numpy()
    (single,) = g.ground(im1, ["the red circle"])
    assert single.dtype == bool and single.shape == (60, 90) and np.array_equal(single, by_eval[0])
    assert np.array_equal(g.ground(np.asarray(im1), ["the red circle"])[0], by_eval[0])  # numpy in, same
    batched = g.ground([im1, im2], [["the red circle"], ["a big blue square", "zebra"]])
    assert [len(b) for b in batched] == [1, 2] and batched[1][0].shape == (80, 80)
    logits = g.ground([im1, im2], [["the red circle"], ["a big blue square", "zebra"]], return_logits=True)
    for got, k in zip([logits[0][0], logits[1][0], logits[1][1]], range(3)):
        assert got.dtype == np.float32
        near = np.abs(got) < 1e-4  # batching (right padding) may move a logit by ~1e-6: only pixels at 0 may flip
        assert np.array_equal((got > 0)[~near], by_eval[k][~near]), k
    assert np.array_equal(batched[1][1], logits[1][1] > 0)
    # together: both phrases in one sequence (flmm protocol); causal, so the first one reads what it reads alone
    first, second = g.ground(im2, ["a big blue square", "zebra"], together=True, return_logits=True)
    near = np.abs(first) < 1e-4
    assert np.array_equal((first > 0)[~near], by_eval[1][~near]) and second.shape == (80, 80)
    with pytest.raises(TypeError, match="non-empty list of str"):
        g.ground(im1, "the red circle")
    with pytest.raises(ValueError, match="2 images but 1 phrase lists"):
        g.ground([im1, im2], [["a"]])


def test_maps_are_the_frozen_outputs_and_the_picture_is_drawn(grounding, trained, tmp_path, monkeypatch):
    g = grounding
    im1, _ = pictures()
    (m,) = g.maps(im1, ["the red circle"])
    L, H = g.layers, g.heads
    _, grid = qwen_inputs.patchify(im1, **g.image_settings)
    assert m["maps"].shape == (L * H, int(grid[0, 1]) // 2, int(grid[0, 2]) // 2) and m["maps"].dtype == np.float32
    assert m["labels"][2 * H + 1] == "L2 H1" and len(m["labels"]) == L * H
    sample = qwen_inputs.build_inputs(g.tokenizer, grid, ["the red circle"])
    batch = qwen_inputs.collate([dict(sample, pixel_values=qwen_inputs.patchify(im1, **g.image_settings)[0],
                                      image_grid_thw=grid)])
    (want,) = model.phrase_attention(g.qwen, batch)
    np.testing.assert_allclose(m["maps"], want.numpy(), atol=1e-6)
    # the picture ranks heads by the U-Net's first-layer weights: make channel (layer 2, head 3) the strongest
    head = g.grounder.head
    c = 2 * H + 3
    with torch.no_grad():
        saved = head.down[0][0].weight[:, c].clone()
        head.down[0][0].weight[:, c] = 10
    try:
        assert int(head.channel_weights().argmax()) == c
        picture = g.maps_picture(im1, "the red circle", top=2)
    finally:
        with torch.no_grad():
            head.down[0][0].weight[:, c] = saved
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[1] > picture.shape[0]
    # eval.py --maps draws the same picture (the head restored: rank of other heads)
    path = tmp_path / "photo.png"
    im1.save(path)
    run_eval(monkeypatch, "--ckpt", trained, "--image", str(path), "--text", "the red circle", "--maps",
             str(tmp_path / "maps.png"), "--out", str(tmp_path / "overlay.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "maps.png")), g.maps_picture(im1, "the red circle"))
    with pytest.raises(SystemExit, match="--maps need --image"):
        run_eval(monkeypatch, "--ckpt", trained, "--maps", str(tmp_path / "m.png"))


def test_top_heads_follow_the_weights():
    """attention_picture's labels name the heads with the largest weights, in order."""
    image = np.full((40, 40, 3), 128, np.uint8)
    maps = np.random.default_rng(0).random((2 * 3, 5, 5)).astype(np.float32)
    weights = np.array([0.1, 0.2, 5.0, 0.3, 4.0, 0.0])
    drawn = []
    original = draw._captioned

    def spy(tile, text, width=None):
        drawn.append(text)
        return original(tile, text, width)
    try:
        draw._captioned = spy
        draw.attention_picture(image, maps, np.zeros((40, 40), bool), "x", heads=3, weights=weights, top=2)
    finally:
        draw._captioned = original
    assert drawn[:2] == ["layer 0", "layer 1"] and drawn[2:4] == ["L0 H2", "L1 H1"], drawn


def test_export_round_trip_and_refusals(grounding, trained, tmp_path, monkeypatch, synthetic_root):
    run_dir = os.path.dirname(trained)
    with open(os.path.join(run_dir, "commands.txt"), "w") as f:
        f.write("python train.py --cfg configs/x.yaml max_steps=4\n")
    out = tmp_path / "export"
    monkeypatch.setattr(sys, "argv", ["export.py", "--ckpt", trained, "--out", str(out)])
    export.main()
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors", "train_config.yaml"]
    assert open(out / "model.safetensors", "rb").read(2) != b"PK"  # safetensors, not a torch zip (pickle)
    meta = json.load(open(out / "config.json"))
    ckpt = torch.load(trained, weights_only=True)
    assert meta["base_vlm"]["name"] == ckpt["config"]["model"] and meta["grounder_kwargs"] == ckpt["grounder_kwargs"]
    assert meta["image_settings"] == grounding.image_settings and meta["code"]["code_version"]
    card = open(out / "README.md").read()
    assert "| synthetic_val |" in card and "max_steps=4" in card and "cIoU" in card
    loaded = build.load_checkpoint(str(out))
    assert set(loaded) == {"config", "grounder", "grounder_kwargs", "step", "base_vlm"}
    assert all(torch.equal(loaded["grounder"][k], v) for k, v in ckpt["grounder"].items())

    im1, im2 = pictures()
    again = ground.load_grounder(str(out), device="cpu")
    phrases = [["the red circle"], ["a big blue square", "zebra"]]
    for a, b in zip(sum(grounding.ground([im1, im2], phrases), []), sum(again.ground([im1, im2], phrases), [])):
        assert np.array_equal(a, b)
    for ckpt_arg, name in ((trained, "ckpt"), (str(out), "dir")):  # eval.py --ckpt DIR scores what ckpt.pt scores
        run_eval(monkeypatch, "--ckpt", ckpt_arg, "--out", str(tmp_path / f"{name}.json"))
    assert (json.load(open(tmp_path / "ckpt.json"))["results"] == json.load(open(tmp_path / "dir.json"))["results"])

    other = str(tmp_path / "other_qwen")  # another tiny VLM: 2 layers instead of 4
    synthetic.build_tiny_qwen(other, ["the red circle", "a big blue square"] * 5, seed=1, layers=2)
    for path in (str(out), trained):
        with pytest.raises(SystemExit, match=rf"trained on the VLM '.*tiny_qwen.*', not on '{other}'.*layers \(4 vs 2\)"):
            ground.load_grounder(path, device="cpu", model=other)
    with pytest.raises(SystemExit, match="other_qwen.*layers"):
        run_eval(monkeypatch, "--ckpt", str(out), "--model", other)
    with pytest.raises(SystemExit, match="not an export.py directory.*give its ckpt.pt"):
        ground.load_grounder(run_dir, device="cpu")
    with pytest.raises(SystemExit, match="no such file or directory, and not downloadable as a Hub repo"):
        ground.load_grounder("nobody/no-such-grounder", device="cpu")


def test_tensorboard_gets_the_maps_picture(tiny_qwen, synthetic_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny_config(tiny_qwen[0], synthetic_root, tmp_path, max_steps=2, eval_every=1, vis_samples=0)
    train.train(cfg, torch.device("cpu"))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("eval/attention_maps")] == [1, 2]


def test_answer_and_ground_is_chats_path(grounding):
    import chat
    g = grounding
    im1, im2 = pictures()
    answers = chat.generate(g.qwen, g.tokenizer, [im1, im2], ["What is this?"] * 2, g.image_settings, max_new_tokens=6)
    with pytest.raises(ValueError, match="no phrase selector"):
        g.answer_and_ground(im1, "What is this?", max_new_tokens=6)
    words = [[a.split()[0]] for a in answers]  # the first word of each greedy answer, grounded
    got = g.answer_and_ground([im1, im2], ["What is this?"] * 2, words, max_new_tokens=6)
    want = chat.ground(g.qwen, g.grounder, g.tokenizer, g.image_settings, [im1, im2], ["What is this?"] * 2, answers,
                       words)
    for r, w, a, p, im in zip(got, want, answers, words, (im1, im2)):
        assert r["answer"] == a and r["phrases"] == p and r["masks"][0].shape == (im.height, im.width)
        assert np.array_equal(r["masks"][0], w["masks"][0].numpy())
