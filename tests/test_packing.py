"""Packing an image's sentences behind one shared prefix (qwen_inputs.build_packed): every sentence gets exactly what
its own one-sentence sequence gives, in every family (GQA, images of different sizes and sentence counts, an image
with a single sentence, padding), the vision tower runs once per packed row, and the length cap splits exactly."""
import pytest
import torch

import batching
import model
import qwen_inputs as qi
from test_families import build, image

SIZES = [(56, 84), (112, 112), (84, 140)]  # (H, W) px
SENTENCES = [["the red circle", "a big blue square at the top", "zebra"], ["man holding a dog"],
             ["two trees", "the person in white (left)"]]  # 3, 1 and 2 sentences of one phrase each


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def family(request, tmp_path_factory):
    _, qwen, tokenizer = build(str(tmp_path_factory.mktemp(request.param)), request.param)
    return request.param, qwen, tokenizer


def images(tokenizer):
    return [qi.patchify(image(size, seed), **tokenizer.image_settings) for seed, size in enumerate(SIZES)]


def alone(tokenizer, pictures):
    """The standard protocol's layout: one build_inputs sequence per sentence."""
    return qi.collate([dict(qi.build_inputs(tokenizer, grid, [sentence]), pixel_values=pv, image_grid_thw=grid)
                       for (pv, grid), sentences in zip(pictures, SENTENCES) for sentence in sentences])


def packed(tokenizer, pictures, max_tokens=0):
    samples = [dict(part, pixel_values=pv, image_grid_thw=grid)
               for (pv, grid), sentences in zip(pictures, SENTENCES)
               for part, _ in batching.split_packed(qi.build_packed(tokenizer, grid, [[s] for s in sentences]),
                                                    max_tokens)]
    return qi.collate(samples)


def outputs(qwen, batch):
    return model.frozen_outputs(qwen, batch, vision=True, hidden_layers=2, answer_layers=2)


def test_build_packed_lays_out_one_prefix_then_each_sentence(tiny_qwen):
    _, _, tokenizer = tiny_qwen
    pv, grid = qi.patchify(image((56, 84)))
    ones = [qi.build_inputs(tokenizer, grid, [s]) for s in SENTENCES[0]]
    pack = qi.build_packed(tokenizer, grid, [[s] for s in SENTENCES[0]])
    prefix = int((pack["segment_ids"] == 0).sum())
    assert torch.equal(pack["input_ids"][:prefix], ones[0]["input_ids"][:prefix])
    assert torch.equal(pack["mm_token_type_ids"][:prefix], ones[0]["mm_token_type_ids"][:prefix])
    for s, one in enumerate(ones):  # sentence s: its own answer tokens, its phrase numbered s
        own = pack["segment_ids"] == s + 1
        assert torch.equal(pack["input_ids"][own], one["input_ids"][prefix:])
        assert torch.equal(pack["mask_ids"][own], torch.where(one["mask_ids"][prefix:] >= 0, s, -1))
        assert len(one["input_ids"]) == prefix + int(own.sum())  # the prefix is everything before the answer
    assert pack["mm_token_type_ids"][prefix:].sum() == 0


def test_split_packed_respects_the_cap(tiny_qwen):
    _, _, tokenizer = tiny_qwen
    _, grid = qi.patchify(image((56, 84)))
    pack = qi.build_packed(tokenizer, grid, [[s] for s in SENTENCES[0]])
    prefix = int((pack["segment_ids"] == 0).sum())
    lengths = torch.bincount(pack["segment_ids"])[1:].tolist()
    cap = prefix + lengths[0] + lengths[1]  # the first two fit, the third does not
    parts = batching.split_packed(pack, cap)
    assert [rows for _, rows in parts] == [[0, 1], [2]]
    assert all(len(p["input_ids"]) <= cap for p, _ in parts)
    again = qi.build_packed(tokenizer, grid, [[s] for s in SENTENCES[0][2:]])
    assert all(torch.equal(parts[1][0][k], again[k]) for k in again)  # renumbered as if packed alone
    assert [rows for _, rows in batching.split_packed(pack, 1)] == [[0], [1], [2]]  # a cap below one sentence: one each
    assert batching.split_packed(pack, 0) == [(pack, [0, 1, 2])]


@pytest.mark.parametrize("max_tokens", [0, 1])  # 0: an image's sentences in one row; 1: every sentence its own row
def test_packed_outputs_equal_one_sentence_sequences(family, max_tokens):
    """Maps (1e-5), phrase hidden states and answer states (1e-4 relative), vision features: each sentence as alone.
    A mask that let a sentence see the one before it, or positions that ran on, fail this."""
    name, qwen, tokenizer = family
    pictures = images(tokenizer)
    ref, out = outputs(qwen, alone(tokenizer, pictures)), outputs(qwen, packed(tokenizer, pictures, max_tokens))
    assert len(out["maps"]) == len(ref["maps"]) == sum(map(len, SENTENCES))
    for m, r in zip(out["maps"], ref["maps"], strict=True):
        assert m.shape == r.shape and (m - r).abs().max().item() <= 1e-5, name
    for key in ("hidden", "answer"):
        for h, r in zip(out[key], ref[key], strict=True):
            assert h.shape == r.shape and ((h - r).norm() / r.norm()).item() <= 1e-4, (name, key)
    for p, r in zip(out["phrase_image"], ref["phrase_image"], strict=True):  # each phrase's image's features
        assert torch.allclose(out["vision"][p], ref["vision"][r], atol=1e-5)
    rows = len(SENTENCES) if max_tokens == 0 else sum(map(len, SENTENCES))
    assert len(out["vision"]) == rows  # the vision tower saw each image once per packed row


def test_vision_tower_runs_once_per_packed_row(family):
    name, qwen, tokenizer = family
    calls = []
    handle = qwen.model.visual.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        batch = packed(tokenizer, images(tokenizer))
        model.frozen_outputs(qwen, batch)
    finally:
        handle.remove()
    assert calls == [int(batch["image_grid_thw"].prod(-1).sum())] and len(batch["image_grid_thw"]) == len(SIZES)


def test_a_packed_and_an_unpacked_sample_batch_together(tiny_qwen):
    """collate pads segment_ids and gives a build_inputs sample one sentence: mixed batches (a narrative beside packed
    sentences) give each sample what it gives alone."""
    _, qwen, tokenizer = tiny_qwen
    (pv0, g0), (pv1, g1) = images(tokenizer)[:2]
    one = dict(qi.build_inputs(tokenizer, g0, ["the red circle", "zebra"]), pixel_values=pv0, image_grid_thw=g0)
    pack = dict(qi.build_packed(tokenizer, g1, [["two trees"], ["man holding a dog"]]), pixel_values=pv1,
                image_grid_thw=g1)
    both = model.frozen_outputs(qwen, qi.collate([one, pack]), answer_layers=1)
    first, second = (model.frozen_outputs(qwen, qi.collate([s]), answer_layers=1) for s in (one, pack))
    for m, r in zip(both["maps"], first["maps"] + second["maps"], strict=True):
        assert (m - r).abs().max().item() <= 1e-5
    assert [a.shape[0] for a in both["answer"]] == [a.shape[0] for a in first["answer"] + second["answer"]]


def test_a_packed_batch_counts_its_sentences(tiny_qwen):
    """The selector's loss is a mean per answer: a packed row holds several, and the step's "sequence" count
    (train.step_counts) must count them as the one-sequence-per-sentence batch of the same sentences does."""
    import head as heads
    import train
    _, qwen, tokenizer = tiny_qwen
    pictures = images(tokenizer)
    answers = len(model.frozen_outputs(qwen, packed(tokenizer, pictures), answer_layers=1)["answer"])
    for batch in (packed(tokenizer, pictures), alone(tokenizer, pictures)):
        batch["phrases"] = [["x"] * n for n in (batch["mask_ids"].max(1).values + 1).tolist()]  # phrases per row
        batch["supervised"] = [[True] * len(p) for p in batch["phrases"]]
        assert heads.sentence_count(batch) == answers == sum(map(len, SENTENCES))
        assert train.step_counts([batch], torch.device("cpu"))["sequence"] == answers
