"""model.py: attention capture against eager attention, vision feature order, the head, training, bad input."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

import capture
import head as heads
import model
import qwen_inputs as qi

SIZES = [(56, 84), (112, 112), (84, 140)]  # (H, W) px: grids 4x6, 8x8, 6x10 patches, three sizes in one batch
PHRASES = [["the red circle", "a big blue square at the top"], ["man holding a dog", "the yellow star", "zebra"],
           ["small green triangle, right", "two trees"]]


def make_sample(tokenizer, size, phrases, seed=0):
    rng = np.random.default_rng(seed)
    pixel_values, grid = qi.patchify(Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)))
    sample = dict(qi.build_inputs(tokenizer, grid, phrases), pixel_values=pixel_values, image_grid_thw=grid)
    _, gh, gw = grid[0].tolist()
    masks = torch.zeros(len(phrases), gh * 14, gw * 14)
    for k in range(len(phrases)):  # a different rectangle per phrase
        masks[k, k * 7:gh * 7 + k * 7, gw * 3:] = 1
    return dict(sample, masks=masks, supervised=[True] * len(phrases))


@pytest.fixture(scope="module")
def batch(tiny_qwen):
    _, _, tokenizer = tiny_qwen
    return qi.collate([make_sample(tokenizer, s, p, seed=i) for i, (s, p) in enumerate(zip(SIZES, PHRASES))])


def reference_maps(eager, batch):
    """F-LMM's way: eager attention with output_attentions, phrase rows, image columns, mean over tokens."""
    with torch.no_grad():
        out = eager.model(**{k: batch[k] for k in model.MODEL_INPUTS}, output_attentions=True, use_cache=False)
    att = torch.stack(out.attentions, 1)  # (B, L, H, S, S)
    maps = []
    for b, (_, gh, gw) in enumerate(batch["image_grid_thw"].tolist()):
        cols = (batch["mm_token_type_ids"][b] == 1).nonzero().flatten()
        for k in range(int(batch["mask_ids"][b].max()) + 1):
            rows = (batch["mask_ids"][b] == k).nonzero().flatten()
            maps.append(att[b][:, :, rows][..., cols].mean(2).reshape(-1, gh // 2, gw // 2))  # (L*H, gh/2, gw/2)
    return maps


def test_phrase_attention_matches_eager(tiny_qwen, batch):
    model_dir, qwen, _ = tiny_qwen
    assert qwen.config.text_config._attn_implementation == capture.CAPTURE_ATTENTION  # SDPA + capture
    text = qwen.config.text_config
    assert text.num_key_value_heads < text.num_attention_heads  # GQA is exercised
    eager = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    maps = model.phrase_attention(qwen, batch)
    ref = reference_maps(eager, batch)
    assert len(maps) == len(ref) == sum(map(len, PHRASES))
    for m, r in zip(maps, ref):
        assert m.dtype == torch.float32 and m.shape == r.shape
        assert m.shape[0] == text.num_hidden_layers * text.num_attention_heads
        assert (m - r).abs().max().item() <= 1e-5


def test_batched_equals_single(tiny_qwen, batch):
    _, qwen, tokenizer = tiny_qwen
    maps = model.phrase_attention(qwen, batch)
    single = []
    for i, (s, p) in enumerate(zip(SIZES, PHRASES)):
        single += model.phrase_attention(qwen, qi.collate([make_sample(tokenizer, s, p, seed=i)]))
    for m, s in zip(maps, single, strict=True):
        assert (m - s).abs().max().item() <= 1e-5


def test_vision_features_follow_the_model(tiny_qwen):
    """Images wider than one 112-px window, so the tower's window permutation is not the identity: the merger
    on our (C, gh, gw) features, re-flattened to 2x2 merge blocks, must give the model's image embeddings."""
    _, qwen, tokenizer = tiny_qwen
    b = qi.collate([make_sample(tokenizer, (168, 252), ["zebra"]),
                    make_sample(tokenizer, (252, 196), ["two trees"], seed=1)])
    out = model.frozen_outputs(qwen, b, vision=True)
    maps, feats = out["maps"], out["vision"]
    vis = qwen.model.visual
    assert len(feats) == 2 and not vis.merger._forward_pre_hooks
    with torch.no_grad():
        embeds = torch.cat(qwen.model.get_image_features(b["pixel_values"], b["image_grid_thw"]).pooler_output)
        blocks = torch.cat([f.view(f.shape[0], f.shape[1] // 2, 2, f.shape[2] // 2, 2).permute(1, 3, 2, 4, 0)
                            .reshape(-1, f.shape[0]) for f in feats])  # (num_patches, C) in merge-block order
        assert (vis.merger(blocks) - embeds).abs().max().item() < 1e-5
    for f, m, (_, gh, gw) in zip(feats, maps, b["image_grid_thw"].tolist()):
        assert f.shape == (vis.config.hidden_size, gh, gw) and m.shape[-2:] == (gh // 2, gw // 2)


def test_vision_features_are_raster(tiny_qwen):
    """With the blocks removed the features are the patch embedding: patch (r, c) of the image, computed from
    the raster image directly (no merge-block layout involved), must sit at [:, r, c]."""
    _, qwen, tokenizer = tiny_qwen
    bare = copy.deepcopy(qwen)
    bare.model.visual.blocks = torch.nn.ModuleList()
    sample = make_sample(tokenizer, (168, 252), ["zebra"])
    (feats,) = model.frozen_outputs(bare, qi.collate([sample]), vision=True)["vision"]
    rgb = np.asarray(Image.fromarray(np.random.default_rng(0).integers(0, 256, (168, 252, 3), dtype=np.uint8)))
    x = ((rgb.astype(np.float64) / 255).astype(np.float32) - qi.CLIP_MEAN) / qi.CLIP_STD  # (H, W, 3)
    x = torch.from_numpy(x.reshape(12, 14, 18, 14, 3).transpose(0, 2, 4, 1, 3).copy())  # (gh, gw, 3, 14, 14)
    x = x[:, :, :, None].expand(-1, -1, -1, 2, -1, -1).reshape(12 * 18, 3, 2, 14, 14)  # two equal frames
    with torch.no_grad():
        ref = bare.model.visual.patch_embed.proj(x).view(12, 18, -1).permute(2, 0, 1)  # (C, gh, gw)
    assert (feats - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("vision", [0, 24])
def test_mask_head_shapes(vision):
    torch.manual_seed(0)
    head = heads.MaskHead(in_channels=16, base=8, vision_channels=vision)
    grids = [(5, 9), (9, 5), (5, 9), (1, 1), (40, 3)]  # (gh/2, gw/2): grouped by size, any aspect
    maps = [torch.rand(16, h, w) for h, w in grids]
    feats = [torch.randn(vision, 2 * h, 2 * w) for h, w in grids] if vision else None
    out = head(maps, feats)
    assert [tuple(o.shape) for o in out] == [(28 * h, 28 * w) for h, w in grids]
    # grouping must not mix phrases up: the same map alone gives the same logits
    head.eval()
    alone = head(maps[2:3], feats[2:3] if vision else None)[0]
    assert torch.allclose(head(maps, feats)[2], alone, atol=1e-5)
    with pytest.raises(ValueError, match="vision_channels"):
        head(maps, None if vision else [torch.zeros(1, 2, 2)] * len(maps))


def test_head_size_and_checkpoint_keys():
    counts = {c: sum(p.numel() for p in heads.MaskHead(in_channels=c).parameters()) for c in (576, 784)}
    assert 7e6 < counts[576] < counts[784] < 13e6, counts
    head = heads.MaskHead(in_channels=16, base=8)
    heads.load_state(heads.MaskHead(in_channels=16, base=8), head.state_dict(), "head")
    state = dict(head.state_dict(), **{"module.out.bias": torch.zeros(1)})  # a DDP-wrapped head's key
    del state["out.bias"]
    with pytest.raises(KeyError, match=r"missing \['out.bias'\], unexpected \['module.out.bias'\]"):
        heads.load_state(heads.MaskHead(in_channels=16, base=8), state, "head")


@pytest.mark.parametrize("vision", [False, True])
def test_training_steps_touch_only_the_head(tiny_qwen, batch, vision):
    _, qwen, _ = tiny_qwen
    text, before = qwen.config.text_config, {k: v.clone() for k, v in qwen.state_dict().items()}
    torch.manual_seed(0)
    head = heads.MaskHead(in_channels=text.num_hidden_layers * text.num_attention_heads, base=8,
                          vision_channels=qwen.config.vision_config.hidden_size if vision else 0)
    grounder = heads.Grounder(head)
    assert all(k.startswith("head.") for k in grounder.state_dict())
    head_before = [p.detach().clone() for p in head.parameters()]
    optimizer = torch.optim.AdamW(grounder.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        out = grounder(model.frozen_outputs(qwen, batch, vision=vision))
        assert [x.shape for x in out["coarse"]] == [m.shape for ms in batch["masks"] for m in ms]
        loss = sum(heads.phrase_losses(out, batch).values()).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert any(not torch.equal(a, b) for a, b in zip(head_before, head.parameters()))
    assert all(torch.equal(v, qwen.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None and not p.requires_grad for p in qwen.parameters())
    assert not qwen.training


def test_wrong_pixels_stop_before_the_model(tiny_qwen, batch, monkeypatch):
    _, qwen, _ = tiny_qwen

    def boom(*args, **kwargs):
        raise AssertionError("transformers code ran on inconsistent inputs")
    monkeypatch.setattr(qwen.model, "forward", boom)
    monkeypatch.setattr(qwen.model.visual, "forward", boom)
    bad = dict(batch, input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1],
               mm_token_type_ids=batch["mm_token_type_ids"][:1], mask_ids=batch["mask_ids"][:1],
               image_grid_thw=batch["image_grid_thw"][:1])  # pixel_values of three images, the grid of one
    n, expect = bad["pixel_values"].shape[0], int(bad["image_grid_thw"].prod())
    with pytest.raises(ValueError, match=rf"{n} patch rows.*{expect} patches"):
        model.phrase_attention(qwen, bad)


def test_varlen_vision_attention_equals_stock_sdpa(tiny_qwen):
    """One padded SDPA call per vision block must give what transformers' per-window SDPA loop gives, on images
    whose 112-px windows have different sizes (edge windows are cut)."""
    model_dir, qwen, tokenizer = tiny_qwen
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                               attn_implementation="sdpa").eval()
    b = qi.collate([make_sample(tokenizer, (168, 252), ["zebra"]), make_sample(tokenizer, (252, 196), ["x"], seed=1),
                    make_sample(tokenizer, (56, 56), ["y"], seed=2)])
    assert qwen.config.vision_config._attn_implementation == capture.VISION_ATTENTION
    with torch.no_grad():
        ours = qwen.model.get_image_features(b["pixel_values"], b["image_grid_thw"]).pooler_output
        ref = stock.model.get_image_features(b["pixel_values"], b["image_grid_thw"]).pooler_output
    for o, r in zip(ours, ref, strict=True):
        assert o.shape == r.shape and (o - r).abs().max().item() < 1e-5
