"""Every supported family on a tiny random checkpoint: the checkpoint's own image settings, phrase attention equal to
eager, vision features, stock-SDPA generation, training steps, and FSDP2 sharding over two gloo processes."""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import capture
import draw
import head as heads
import model
import qwen_inputs as qi
import synthetic
from conftest import TEXTS

SIZES = [(56, 84), (112, 112), (84, 140)]  # (H, W) px: three resolutions in one batch
PHRASES = [["the red circle", "a big blue square at the top"], ["man holding a dog", "zebra"], ["two trees"]]


def image(size, seed=0, mode="RGB"):
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 4), dtype=np.uint8)
    return Image.fromarray(arr if mode == "RGBA" else arr[..., :3], mode=mode)


def sample(tokenizer, size, phrases, seed=0):
    pixel_values, grid = qi.patchify(image(size, seed), **tokenizer.image_settings)
    _, gh, gw = grid[0].tolist()
    patch = tokenizer.image_settings["patch_size"]
    masks = torch.zeros(len(phrases), gh * patch, gw * patch)
    for k in range(len(phrases)):  # a different rectangle per phrase
        masks[k, k * 8:gh * patch // 2 + k * 8, gw * patch // 3:] = 1
    return dict(qi.build_inputs(tokenizer, grid, phrases), pixel_values=pixel_values, image_grid_thw=grid, masks=masks,
                supervised=[True] * len(phrases))


def build(out_dir, family):
    synthetic.build_tiny_qwen(out_dir, TEXTS, family=family, seed=0)
    return (out_dir, *model.load_qwen(out_dir, dtype=torch.float32, device="cpu"))


@pytest.fixture(scope="module", params=synthetic.TINY_FAMILIES)
def family(request, tmp_path_factory):
    """(family, model_dir, qwen, tokenizer, batch): float32 on the CPU; GQA (4 heads over 2 kv heads)."""
    model_dir, qwen, tokenizer = build(str(tmp_path_factory.mktemp(request.param)), request.param)
    batch = qi.collate([sample(tokenizer, s, p, seed=i) for i, (s, p) in enumerate(zip(SIZES, PHRASES))])
    return request.param, model_dir, qwen, tokenizer, batch


def stock(family, model_dir, attn):
    return model.FAMILIES[family].from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()


def test_patchify_follows_the_checkpoint(family):
    name, model_dir, qwen, tokenizer, _ = family
    settings = qi.image_settings(model_dir)
    assert tokenizer.image_settings == settings and type(qwen) is model.FAMILIES[name]
    official = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    patch = 16 if name.startswith("qwen3") else 14
    for img in (image((333, 517)), image((101, 77), seed=1, mode="RGBA"), image((20, 900), seed=2)):
        ours, grid = qi.patchify(img, **settings)
        ref = official(images=img, return_tensors="pt")
        assert torch.equal(grid, ref["image_grid_thw"])
        assert ours.shape == ref["pixel_values"].shape == (int(grid.prod()), 3 * 2 * patch * patch)
        assert (ours - ref["pixel_values"]).abs().max().item() == 0
        (restored,) = draw.unpatchify(ours, grid, **settings)
        assert np.array_equal(restored, qi.resized_rgb(img, settings["min_pixels"], settings["max_pixels"], 2 * patch))


def reference(eager, batch, layers):
    """Eager attention with output_attentions (F-LMM's way) and the decoder layers' outputs at the phrase rows."""
    with torch.no_grad():
        out = eager.model(**{k: batch[k] for k in model.MODEL_INPUTS}, output_attentions=True,
                          output_hidden_states=True, use_cache=False)
    att = torch.stack(out.attentions, 1)  # (B, L, H, S, S)
    hidden = list(out.hidden_states[1:-1]) + [out.last_hidden_state]  # the last is after the final norm
    maps, rows_hidden = [], []
    for b, (_, gh, gw) in enumerate(batch["image_grid_thw"].tolist()):
        cols = (batch["mm_token_type_ids"][b] == 1).nonzero().flatten()
        for k in range(int(batch["mask_ids"][b].max()) + 1):
            rows = (batch["mask_ids"][b] == k).nonzero().flatten()
            maps.append(att[b][:, :, rows][..., cols].mean(2).reshape(-1, gh // 2, gw // 2))  # (L*H, gh/2, gw/2)
            rows_hidden.append(torch.stack([h[b, rows] for h in hidden[-layers:]], 1))  # (tokens, n, C)
    return maps, rows_hidden


def test_frozen_outputs_match_eager(family):
    """Maps from SDPA + capture equal eager attention's (1e-5, float32) on a batch of three resolutions; the
    phrase hidden states equal the eager model's; the vision features, merged, are the model's image embeddings."""
    name, model_dir, qwen, _, batch = family
    text = qwen.config.text_config
    assert text.num_key_value_heads < text.num_attention_heads  # GQA is exercised
    out = model.frozen_outputs(qwen, batch, vision=True, hidden_layers=2)
    maps, hidden = reference(stock(name, model_dir, "eager"), batch, layers=2)
    assert len(out["maps"]) == len(maps) == sum(map(len, PHRASES))
    for m, r in zip(out["maps"], maps, strict=True):
        assert m.shape == r.shape and m.shape[0] == text.num_hidden_layers * text.num_attention_heads
        assert (m - r).abs().max().item() <= 1e-5
    for h, r in zip(out["hidden"], hidden, strict=True):
        h = torch.cat([h[:, :-1], qwen.model.language_model.norm(h[:, -1:])], 1)  # eager's last is normed
        assert h.shape == r.shape and (h - r).abs().max().item() <= 1e-5
    vis = qwen.model.visual
    with torch.no_grad():
        embeds = torch.cat(qwen.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
        blocks = torch.cat([f.view(f.shape[0], f.shape[1] // 2, 2, f.shape[2] // 2, 2).permute(1, 3, 2, 4, 0)
                            .reshape(-1, f.shape[0]) for f in out["vision"]])  # (num_patches, C) merge-block order
        assert (vis.merger(blocks) - embeds).abs().max().item() < 1e-5
    for f, (_, gh, gw) in zip(out["vision"], batch["image_grid_thw"].tolist(), strict=True):
        assert f.shape == (model.vision_channels(qwen.config), gh, gw)


def test_vision_attention_equals_stock_sdpa(family):
    """One packed SDPA call per block equals transformers' per-image (per-window) SDPA loop, every family."""
    name, model_dir, qwen, _, batch = family
    assert qwen.config.vision_config._attn_implementation == capture.VISION_ATTENTION
    ref_model = stock(name, model_dir, "sdpa")
    with torch.no_grad():
        ours = qwen.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        ref = ref_model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    for o, r in zip(ours.pooler_output, ref.pooler_output, strict=True):
        assert o.shape == r.shape and (o - r).abs().max().item() < 1e-5
    deepstack = ours.get("deepstack_features") or []  # Qwen3-VL: what DeepStack adds to the first decoder layers
    assert bool(deepstack) == name.startswith("qwen3")
    for o, r in zip(deepstack, ref.get("deepstack_features") or [], strict=True):  # a tuple (per image) per layer
        assert (torch.cat(o) - torch.cat(r)).abs().max().item() < 1e-5


def test_generate_equals_stock_sdpa(family):
    """The chat model is untouched: greedy generation with load_qwen's attention equals stock SDPA's, left-padded."""
    name, model_dir, qwen, tokenizer, batch = family
    samples = [sample(tokenizer, (56, 84), ["the red circle"]), sample(tokenizer, (84, 140), ["zebra", "two"], 1)]
    S = max(len(s["input_ids"]) for s in samples)
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def left(key, value):
        return torch.stack([torch.cat([torch.full((S - len(s[key]),), value), s[key]]) for s in samples])
    inputs = dict(input_ids=left("input_ids", pad), mm_token_type_ids=left("mm_token_type_ids", 0),
                  attention_mask=torch.stack([torch.arange(S) >= S - len(s["input_ids"]) for s in samples]).long(),
                  pixel_values=torch.cat([s["pixel_values"] for s in samples]),
                  image_grid_thw=torch.cat([s["image_grid_thw"] for s in samples]))
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=pad)
    with torch.no_grad():
        ours = qwen.generate(**inputs, **kw)
        ref = stock(name, model_dir, "sdpa").generate(**inputs, **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(ours.logits, ref.logits, strict=True)) <= 1e-4


def test_training_steps_lower_the_loss(family):
    name, _, qwen, tokenizer, batch = family
    text = qwen.config.text_config
    torch.manual_seed(0)
    settings = tokenizer.image_settings
    grounder = heads.Grounder(heads.MaskHead(in_channels=text.num_hidden_layers * text.num_attention_heads, base=8,
                                             vision_channels=model.vision_channels(qwen.config),
                                             token_px=settings["patch_size"] * settings["merge_size"]))
    optimizer = torch.optim.AdamW(grounder.parameters(), lr=3e-3)
    frozen = model.frozen_outputs(qwen, batch, vision=True)  # frozen: the same every step
    losses = []
    for _ in range(4):
        out = grounder(frozen)
        assert [x.shape for x in out["coarse"]] == [m.shape for ms in batch["masks"] for m in ms]
        loss = sum(heads.phrase_losses(out, batch).values()).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_pixels_of_another_family_are_refused(family):
    name, _, qwen, tokenizer, batch = family
    other = qi.patchify(image((56, 84)), patch_size=14 if name.startswith("qwen3") else 16)[0]
    bad = dict(batch, pixel_values=torch.zeros(len(batch["pixel_values"]), other.shape[1]))
    with pytest.raises(ValueError, match=rf"\(num_patches, {batch['pixel_values'].shape[1]}\)"):
        model.frozen_outputs(qwen, bad)


def test_load_qwen_names_the_supported_families(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "llava"}, f)
    supported = r"\['qwen2_5_vl', 'qwen2_vl', 'qwen3_vl', 'qwen3_vl_moe'\]"
    with pytest.raises(ValueError, match=r"model_type 'llava'.*" + supported):
        model.load_qwen(str(tmp_path), dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("raw", [
    {},  # every key from the class defaults (max 1003520, not the Hub's 12845056)
    {"size": {"shortest_edge": 1000, "longest_edge": 50000}, "max_pixels": 200000, "patch_size": 16},  # max_pixels wins
    {"size": {"shortest_edge": 1000, "longest_edge": 10 ** 6}, "min_pixels": 300000},  # min_pixels wins
    {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16, "image_mean": [0.5] * 3,
     "image_std": [0.5] * 3, "temporal_patch_size": 2, "merge_size": 2}])
def test_image_settings_read_json_like_the_processor(tmp_path, raw):
    with open(tmp_path / "preprocessor_config.json", "w") as f:
        json.dump(raw, f)
    official = Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path))
    img = image((300, 451))
    ours, grid = qi.patchify(img, **qi.image_settings(str(tmp_path)))
    ref = official(images=img, return_tensors="pt")
    assert torch.equal(grid, ref["image_grid_thw"]) and torch.equal(ours, ref["pixel_values"])


def test_image_settings_from_the_hub_cache_and_bad_settings(tmp_path, monkeypatch):
    """A Hub id resolves through huggingface_hub's cache (offline once downloaded); settings patchify cannot
    reproduce are refused."""
    import huggingface_hub.constants
    snapshot = tmp_path / "models--Qwen--Qwen3-VL-8B-Instruct" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--Qwen--Qwen3-VL-8B-Instruct" / "refs").mkdir()
    (tmp_path / "models--Qwen--Qwen3-VL-8B-Instruct" / "refs" / "main").write_text("0" * 40)
    (snapshot / "preprocessor_config.json").write_text(json.dumps(synthetic.QWEN3_PREPROCESSOR))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert qi.image_settings("Qwen/Qwen3-VL-8B-Instruct") == dict(
        min_pixels=65536, max_pixels=16777216, patch_size=16, merge_size=2, temporal_patch_size=2,
        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    (snapshot / "preprocessor_config.json").write_text(json.dumps(dict(synthetic.QWEN3_PREPROCESSOR, resample=2)))
    with pytest.raises(ValueError, match="resample=2"):
        qi.image_settings("Qwen/Qwen3-VL-8B-Instruct")
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json: missing"):
        qi.image_settings(str(tmp_path))


# ------------------------------------------------------------------------------------------- FSDP2, 2 processes

# windows, GQA and tied embeddings (as the 3B; FSDP2 needs them in one unit); DeepStack, MoE and 16-px patches
SHARD_FAMILIES = {"qwen2_5_vl": dict(tied=True), "qwen3_vl_moe": {}}


def _sharded_worker(rank, world, port, dirs, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for name, model_dir in dirs.items():
        qwen, tokenizer = model.load_qwen(model_dir, dtype=torch.float32, device="cpu", shard=True)
        local = sum(p.to_local().numel() for p in qwen.parameters())
        full = sum(p.numel() for p in qwen.parameters())
        # each rank its own batch: rank r takes sample r of the module's three
        batch = qi.collate([sample(tokenizer, SIZES[rank], PHRASES[rank], seed=rank)])
        out = model.frozen_outputs(qwen, batch, vision=True, hidden_layers=1)
        with torch.no_grad():  # the sharded model still chats (every rank steps together: synced_gpus)
            chat = qwen.generate(**{k: batch[k] for k in model.MODEL_INPUTS}, max_new_tokens=3, do_sample=False,
                                 synced_gpus=True)
        # the head: DDP over the same ranks, two steps on different batches
        text = qwen.config.text_config
        torch.manual_seed(0)
        grounder = torch.nn.parallel.DistributedDataParallel(heads.Grounder(heads.MaskHead(
            in_channels=text.num_hidden_layers * text.num_attention_heads, base=8,
            token_px=tokenizer.image_settings["patch_size"] * 2)))
        optimizer = torch.optim.AdamW(grounder.parameters(), lr=1e-2)
        for _ in range(2):
            loss = sum(heads.phrase_losses(grounder(model.frozen_outputs(qwen, batch)), batch).values()).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results[name] = dict(local=local, full=full, maps=out["maps"], vision=out["vision"], hidden=out["hidden"],
                             chat=chat, head=[p.detach().clone() for p in grounder.module.parameters()])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_sharded_maps_equal_single_process(tmp_path):
    """FSDP2 over 2 gloo processes: each rank holds half the weights, runs its own batch, and gets exactly the maps,
    vision features and hidden states one unsharded process gets; the DDP head stays identical on both ranks."""
    dirs = {name: synthetic.build_tiny_qwen(str(tmp_path / name), TEXTS, family=name, **kw)
            for name, kw in SHARD_FAMILIES.items()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers inherit the imported modules (spawn would import torch and transformers again, ~10 s)
    mp.start_processes(_sharded_worker, args=(2, port, dirs, str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, model_dir in dirs.items():
        qwen, tokenizer = model.load_qwen(model_dir, dtype=torch.float32, device="cpu")
        assert (qwen.lm_head.weight is qwen.model.language_model.embed_tokens.weight) == (name == "qwen2_5_vl")
        for rank, res in enumerate(r[name] for r in ranks):
            assert res["full"] == sum(p.numel() for p in qwen.parameters())
            assert res["local"] < 0.6 * res["full"], (name, res["local"], res["full"])  # sharded, not replicated
            batch = qi.collate([sample(tokenizer, SIZES[rank], PHRASES[rank], seed=rank)])
            ref = model.frozen_outputs(qwen, batch, vision=True, hidden_layers=1)
            for key in ("maps", "vision", "hidden"):
                for a, b in zip(res[key], ref[key], strict=True):
                    assert torch.equal(a, b), (name, rank, key)
            with torch.no_grad():
                chat = qwen.generate(**{k: batch[k] for k in model.MODEL_INPUTS}, max_new_tokens=3, do_sample=False)
            assert torch.equal(res["chat"], chat)
        heads0, heads1 = ranks[0][name]["head"], ranks[1][name]["head"]
        assert all(torch.equal(a, b) for a, b in zip(heads0, heads1, strict=True))
