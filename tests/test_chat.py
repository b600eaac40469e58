"""chat.py, the phrase selector and ReasonSeg on the tiny random model: generation equals stock SDPA, the selector
learns, spans map back to the answer's characters, the picture, --phrases errors, ReasonSeg scoring by hand."""
import dataclasses
import re
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

import build
import chat
import draw
import data
import eval as evaluation
import head as heads
import metrics as scoring
import model
import qwen_inputs as qi
import selector as selection


def picture_file(path, size=(56, 84), seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def ckpt(tiny_qwen, tmp_path_factory):
    """A train.py-shaped checkpoint on the tiny model: mask head (untrained) + selector."""
    model_dir, qwen, _ = tiny_qwen
    cfg = build.Config(model=model_dir, dtype="float32", head=dict(base=8, size=16), selector=dict(layers=2, width=16))
    kwargs = build.grounder_kwargs(cfg, qwen.config)
    torch.manual_seed(0)
    grounder = build.build_grounder(kwargs)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save(dict(config=dataclasses.asdict(cfg), grounder=grounder.state_dict(), grounder_kwargs=kwargs, step=0),
               path)
    return str(path)


def run_chat(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["chat.py", *argv])
    chat.main()
    return capsys.readouterr().out


def test_generate_equals_stock_sdpa(tiny_qwen, monkeypatch):
    """chat.generate (load_qwen's attention, batched, left-padded) answers exactly as transformers' stock SDPA model:
    the same tokens, logits within 1e-4."""
    model_dir, qwen, tokenizer = tiny_qwen
    images = [picture_file(f"{model_dir}/a.png", (56, 84), 0),
              picture_file(f"{model_dir}/b.png", (84, 140), 1)]
    questions = ["What is the red circle?", "zebra"]
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                               attn_implementation="sdpa").eval()
    logits = []
    for m in (qwen, stock):  # record the logits of every step, return what generate returns by default
        def generate(*args, _generate=m.generate, **kwargs):
            out = _generate(*args, **kwargs, output_logits=True, return_dict_in_generate=True)
            logits.append(torch.stack(out.logits))
            return out.sequences
        monkeypatch.setattr(m, "generate", generate)
    ours = chat.generate(qwen, tokenizer, images, questions, tokenizer.image_settings, max_new_tokens=8)
    ref = chat.generate(stock, tokenizer, images, questions, tokenizer.image_settings, max_new_tokens=8)
    assert ours == ref and any(ours)  # random text, but the same random text, and not nothing
    assert logits[0].shape == logits[1].shape and (logits[0] - logits[1]).abs().max() <= 1e-4


def frozen_narrative_batch(qwen, tokenizer):
    """Two narratives (phrases joined by " "; filler unsupervised; two supervised phrases side by side, which only a
    B tag separates) and their frozen outputs, answer states of 2 layers."""
    narratives = [(["In this picture I can see", "the red circle", "and", "a big blue square at the top", "."],
                   [False, True, False, True, False]),
                  (["Here we have", "two trees", "the person in white", "."], [False, True, True, False])]
    samples = []
    for i, (phrases, supervised) in enumerate(narratives):
        pixel_values, grid = qi.patchify(Image.new("RGB", (56, 56), (200, 30 * i, 0)), **tokenizer.image_settings)
        _, gh, gw = grid[0].tolist()
        samples.append(dict(qi.build_inputs(tokenizer, grid, phrases, sep=" "), pixel_values=pixel_values,
                            image_grid_thw=grid, supervised=supervised,
                            masks=torch.ones(len(phrases), gh * 14, gw * 14)))
    batch = qi.collate(samples)
    return batch, model.frozen_outputs(qwen, batch, answer_layers=2)


def test_selector_trains(tiny_qwen):
    """Selector on the frozen answer states: its loss falls and it then tags exactly the supervised phrases."""
    _, qwen, tokenizer = tiny_qwen
    batch, frozen = frozen_narrative_batch(qwen, tokenizer)
    text = qwen.config.text_config
    torch.manual_seed(0)
    grounder = heads.Grounder(heads.MaskHead(in_channels=text.num_hidden_layers * text.num_attention_heads, base=8,
                                             size=16),
                              selector=selection.Selector(hidden_size=text.hidden_size, layers=2, width=32))
    assert heads.loss_names(grounder) == ["bce", "dice", "select"]
    optimizer = torch.optim.AdamW(grounder.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        terms = heads.losses(grounder(frozen), batch)
        assert terms["select"][1] == "sequence" and terms["select"][0].shape == (2,)
        loss = sum(v.sum() / len(v) for v, _ in terms.values())
        losses.append(terms["select"][0].mean().item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.2 * losses[0]
    gold = [selection.tag_spans(t) for t in heads.answer_tags(batch)]
    assert [len(g) for g in gold] == [2, 2]
    assert [selection.decode(x) for x in grounder(frozen)["select"]] == gold
    spans = []
    evaluation.predict(None, grounder, dict(batch, frozen=frozen), [(56, 56)] * 2, spans=spans)
    assert scoring.summarize([], "png", spans)["span_F1"] == 100


def test_tags_and_spans_map_back_to_the_answer(tiny_qwen):
    """B/I/O tags of supervised phrases -> token spans -> the exact characters of the answer text; --phrases too."""
    model_dir, qwen, tokenizer = tiny_qwen
    phrases, supervised = ["In this picture I can see", "the red circle", "and", "a big blue square", "."], \
        [False, True, False, True, False]
    answer = " ".join(phrases)
    grid = torch.tensor([[1, 4, 4]])
    sample = qi.build_inputs(tokenizer, grid, phrases, sep=" ")
    tags = selection.token_tags(selection.answer_mask_ids(sample["mask_ids"]), supervised)
    inputs = chat.answer_inputs(tokenizer, grid, "q", answer)
    assert torch.equal(inputs["input_ids"][-len(tags):], sample["input_ids"][-len(tags):])  # same tokens
    spans = selection.char_spans(selection.tag_spans(tags), inputs["offsets"], answer)
    assert [answer[a:b] for a, b in spans] == ["the red circle", "a big blue square"]
    assert spans == [(answer.index("the red"), answer.index("the red") + 14), (answer.index("a big"), len(answer) - 2)]
    token_spans = chat.find_phrases(answer, ["a big blue square", "red circle"], inputs["offsets"])
    assert [answer[a:b] for a, b in selection.char_spans(token_spans, inputs["offsets"], answer)] == [
        "a big blue square", "red circle"]
    assert chat.marked(answer, spans).endswith("[the red circle](1) and [a big blue square](2) .")
    image = Image.new("RGB", (84, 56))
    (res,) = chat.ground(qwen, build.build_grounder(build.grounder_kwargs(build.Config(head=dict(base=8, size=16)),
                                                                          qwen.config)),
                         tokenizer, tokenizer.image_settings, [image], ["q"], [answer], [["blue square", "the red"]])
    assert [answer[a:b] for a, b in res["spans"]] == ["blue square", "the red"]
    assert [m.shape for m in res["masks"]] == [(56, 84)] * 2


def test_span_maps_equal_a_phrase_capture(tiny_qwen):
    """A span's maps in chat (the mean of its tokens' maps, one forward for every answer token) equal the phrase
    capture's for the same tokens: grounding an answer equals grounding the phrase as eval.py does."""
    _, qwen, tokenizer = tiny_qwen
    pixel_values, grid = qi.patchify(Image.new("RGB", (84, 56), (10, 200, 30)), **tokenizer.image_settings)
    answer = "the red circle"
    tokens = model.frozen_outputs(qwen, qi.collate([dict(chat.answer_inputs(tokenizer, grid, qi.DEFAULT_PROMPT, answer),
                                                         pixel_values=pixel_values, image_grid_thw=grid)]))["maps"]
    (phrase,) = model.phrase_attention(qwen, qi.collate([dict(qi.build_inputs(tokenizer, grid, [answer]),
                                                              pixel_values=pixel_values, image_grid_thw=grid)]))
    assert len(tokens) > 1 and (torch.stack(tokens).mean(0) - phrase).abs().max() < 1e-6


def test_picture_one_mask_one_colour_per_phrase(tmp_path, ckpt, monkeypatch, capsys):
    image = np.full((40, 60, 3), 128, np.uint8)
    masks = [np.zeros((40, 60), bool) for _ in range(3)]
    masks[0][5:15, 5:20], masks[1][20:35, 10:30], masks[2][5:30, 40:55] = True, True, True
    pic = draw.phrases_picture(image, masks, ["a", "b", "c"])
    assert pic.shape == (40 + 3 * 14 + 4, 60, 3)
    for k, m in enumerate(masks):
        colour = draw.PALETTE[k]
        inside = pic[:40][m & ~draw.edge(m)]
        assert (inside == np.round(0.5 * 128 + 0.5 * colour.astype(float))).all()  # tinted in its own colour
        assert (pic[:40][draw.edge(m)] == colour).all()  # outlined in it
        assert (pic[40 + 2 + 14 * k + 3, 4:11] == colour).all()  # its legend swatch
    legend = {tuple(c) for c in pic[40:].reshape(-1, 3)}
    assert {tuple(c) for c in draw.PALETTE[:3]} <= legend and not {tuple(c) for c in draw.PALETTE[3:]} & legend
    # the command: as many swatches (and masks) as phrases, the answer marked
    path = tmp_path / "scene.png"
    picture_file(path)
    out = run_chat(monkeypatch, capsys, "--ckpt", ckpt, "--image", str(path), "--ask", "What is there?",
                   "--answer", "a red circle and a blue star", "--phrases", "a red circle,blue star",
                   "--out", str(tmp_path / "pic.png"))
    assert "A: [a red circle](1) and a [blue star](2)" in out
    written = np.asarray(Image.open(tmp_path / "pic.png"))
    assert written.shape == (56 + 2 * 14 + 4, 84, 3)
    swatches = [tuple(written[56 + 2 + 14 * k + 5, 6]) for k in range(2)]
    assert swatches == [tuple(c) for c in draw.PALETTE[:2]]


def test_phrases_not_in_the_answer_are_an_error(tmp_path, ckpt, monkeypatch, capsys):
    path = tmp_path / "scene.png"
    picture_file(path)
    common = ["--ckpt", ckpt, "--image", str(path), "--answer", "a red circle and a blue star", "--out",
              str(tmp_path / "p.png")]
    with pytest.raises(SystemExit, match="'green star' does not occur in the answer 'a red circle and a blue star'"):
        run_chat(monkeypatch, capsys, *common, "--phrases", "red circle,green star")
    with pytest.raises(SystemExit, match="'ed circle' starts or ends inside a word"):
        run_chat(monkeypatch, capsys, *common, "--phrases", "ed circle")
    with pytest.raises(SystemExit, match="'red circle' does not occur .*again"):
        run_chat(monkeypatch, capsys, *common, "--phrases", "red circle,red circle")
    assert not (tmp_path / "p.png").exists()


def write_reasonseg(folder):
    """Two 12x14 images. a: target rectangle rows 2-5 x cols 2-9 (32 px) with an ignore rectangle inside it over
    rows 2-3 x cols 6-9 (8 px; smaller, so painted over the target); b: target rows 0-3 x cols 0-3 (16 px), a "flag"
    mark (skipped)."""
    folder.mkdir()
    rect = lambda x0, y0, x1, y1: [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]  # noqa: E731
    annos = {"a": [dict(label="target", points=rect(2, 2, 10, 6)), dict(label="ignore", points=rect(6, 2, 10, 4))],
             "b": [dict(label="flag", points=rect(0, 0, 14, 12)), dict(label="target", points=rect(0, 0, 4, 4))]}
    for name, shapes in annos.items():
        Image.new("RGB", (14, 12), (90, 90, 90)).save(folder / f"{name}.jpg")
        (folder / f"{name}.json").write_text(json.dumps(dict(shapes=shapes, text=[f"what is {name}?", "other"],
                                                             is_sentence=True)))


def test_reasonseg_loads_and_scores(tmp_path):
    write_reasonseg(tmp_path / "val")
    records = data.load_reasonseg(str(tmp_path / "val"))
    assert [(r["file_name"], r["height"], r["width"], r["texts"][0]) for r in records] == [
        ("a.jpg", 12, 14, "what is a?"), ("b.jpg", 12, 14, "what is b?")]
    (ta, ia), (tb, ib) = (data.reasonseg_masks(r) for r in records)
    assert (ta.sum(), ia.sum(), tb.sum(), ib.sum()) == (24, 8, 16, 0) and not (ta & ia).any()
    # predictions: a: rows 2-5 x cols 4-11 -> inside the target 2 cols x 4 rows + ignored cols 6-9 rows 4-5 (4 px
    # counted) -> I = 8 + 8 = 16 ... computed by hand below; b: rows 0-1 x cols 0-7
    pa = np.zeros((12, 14), bool)
    pa[2:6, 4:12] = True
    pb = np.zeros((12, 14), bool)
    pb[0:2, 0:8] = True
    # a: ignore (rows 2-3, cols 6-9) removed; pred left = rows 2-5 cols 4-11 minus 8 = 24; target 24;
    # I = rows 2-5 cols 4-9 (24) minus ignore (8) = 16; U = 24 + 24 - 16 = 32. b: I = 8, U = 16 + 16 - 8 = 24.
    stats = [scoring.reasonseg_stats(pa, ta, ia), scoring.reasonseg_stats(pb, tb, ib)]
    assert stats == [(16, 32), (8, 24)]
    m = scoring.reasonseg_metrics(stats)
    assert m["gIoU"] == pytest.approx(100 * (16 / 32 + 8 / 24) / 2) and m["cIoU"] == pytest.approx(100 * 24 / 56)
    assert m["n"] == 2


def test_reasonseg_runs_both_modes(tiny_qwen, ckpt, tmp_path):
    """The batched direct and chain-of-thought paths on the fixture: one (I, U) per image per mode."""
    write_reasonseg(tmp_path / "val")
    _, qwen, tokenizer = tiny_qwen
    grounder = heads.load_state(build.build_grounder(torch.load(ckpt)["grounder_kwargs"]), torch.load(ckpt)["grounder"],
                                ckpt)
    stats = chat.reasonseg(qwen, grounder, tokenizer, tokenizer.image_settings,
                           data.load_reasonseg(str(tmp_path / "val")), batch_size=2, cot_tokens=3)
    assert sorted(stats) == ["cot", "direct"] and all(len(s) == 2 for s in stats.values())
    assert all(0 <= i <= u for s in stats.values() for i, u in s)


def test_selector_tags_a_short_answer_batched_with_a_long_one_as_alone():
    """Padded slots are zeroed before the convolution: a short answer's tags do not see its batch-mate's padding
    (LayerNorm and the projection's bias turn zero padding into non-zero features otherwise)."""
    torch.manual_seed(0)
    s = selection.Selector(hidden_size=16, layers=2, width=8)
    short, long = torch.randn(3, 2, 16), torch.randn(11, 2, 16)
    with torch.no_grad():
        (alone,) = s([short])
        batched = s([short, long])
    assert batched[0].shape == (3, 3) and torch.allclose(batched[0], alone, atol=1e-6)


def test_without_a_selector_the_answer_comes_first(tiny_qwen, tmp_path, monkeypatch, capsys):
    """No selector, no --phrases: the VLM still answers, and one line says how to ground phrases of that answer."""
    model_dir, qwen, _ = tiny_qwen
    cfg = build.Config(model=model_dir, dtype="float32", head=dict(base=8, size=16))
    kwargs = build.grounder_kwargs(cfg, qwen.config)
    path = tmp_path / "ckpt.pt"
    torch.save(dict(config=dataclasses.asdict(cfg), grounder=build.build_grounder(kwargs).state_dict(),
                    grounder_kwargs=kwargs, step=0), path)
    image = tmp_path / "scene.png"
    picture_file(image)
    out = run_chat(monkeypatch, capsys, "--ckpt", str(path), "--image", str(image), "--ask", "What is there?",
                   "--max_new_tokens", "4")
    answer = re.search(r"^A: (.*)$", out, re.M).group(1)
    assert "has no phrase selector" in out and f"--answer {json.dumps(answer)} --phrases" in out
    assert "selector: {layers: 0}" in out  # not selector: {}, which is off


def test_empty_questions_and_nothing_grounded_say_so(tmp_path, ckpt, monkeypatch, capsys):
    image = tmp_path / "scene.png"
    picture_file(image)
    for flag in ("--ask", "--answer", "--text"):
        for empty in ("", "   "):
            with pytest.raises(SystemExit, match=f"^{flag}: empty"):
                run_chat(monkeypatch, capsys, "--ckpt", ckpt, "--image", str(image), flag, empty)
    monkeypatch.setattr(selection, "decode", lambda logits: [])  # a selector that tags nothing
    out = run_chat(monkeypatch, capsys, "--ckpt", ckpt, "--image", str(image), "--answer", "a red circle",
                   "--out", str(tmp_path / "p.png"))
    assert "nothing grounded" in out


def test_phrase_colours_are_no_synthetic_objects_colour():
    import synthetic
    for colour in draw.PALETTE.astype(int):
        assert min(np.linalg.norm(colour - np.array(c)) for c in synthetic.COLOURS.values()) >= 90, colour
