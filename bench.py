"""Speed and memory: our capture vs the floor (a plain frozen forward) and vs the F-LMM way (eager attention,
output_attentions=True, full model with lm_head, batch 1). Random weights; RefCOCO-like inputs (640x480 image ->
391 image tokens, 3 phrases of ~5 tokens).

    python bench.py                          # CPU: a wider tiny Qwen2.5-VL, float32
    python bench.py --model 3b --out bench_3b.json   # CUDA: the real 3B architecture, bf16, random weights
    python bench.py --model 7b
    python bench.py --model qwen3vl_8b              # any ARCH name: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense, MoE)
    python bench.py --sam sam2_l                    # the refiner rows with any SAM_ARCH (SAM, SAM-HQ, SAM 2.1, SAM 3)
    python bench.py --sam_encoders vit_b,vit_l,sam2_t,sam2_l --quick   # only SAM image encoders: params, s/image
"""
import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import batching
import build
from bench_models import ARCH, PHRASES, SAM_ARCH, build_model, build_sam, dtype_for
import cache
import cached
import head as heads
import model
import qwen_inputs
import refiner
import synthetic
import vlmbox

MB = 2 ** 20


def stock_sdpa(qwen):
    qwen.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})


def timed(fn, device, repeats, warmup=2):
    """Median seconds of fn() and the most memory a call added over what was held before (bytes)."""
    t, _, m = interleaved({"fn": whole(fn)}, device, repeats, warmup)["fn"]
    return t, m


def whole(fn):
    """fn as `interleaved` takes it, with no part of it timed apart (returns 0)."""
    def call():
        fn()
        return 0.0
    return call


def interleaved(fns, device, repeats, warmup=1):
    """{name: fn} -> {name: (median seconds of fn(), median of what fn() returns, the most memory a call added)}:
    the calls alternate (A B A B ...), so that a shared machine's drift between seconds slows both alike; fn returns
    the seconds of a part of its work (the frozen forward), or 0."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    calls = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            base = reset_peak(device)
            t = time.perf_counter()
            part = fn()
            sync(device)
            calls[name].append((time.perf_counter() - t, part, peak(device) - base))
    return {name: tuple(statistics.median(c[i] for c in cs) for i in (0, 1)) + (max(c[2] for c in cs),)
            for name, cs in calls.items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (peak RSS) to the current RSS
        f.write("5")
    return rss("VmRSS")


def peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return rss("VmHWM")


def fixed_mmap_threshold():
    """CPU peak memory is read from RSS. glibc raises its mmap threshold as blocks are freed, after which freed
    tensors stay in the heap and a later peak hides inside RSS already held; a fixed threshold gives every large
    tensor its own mapping, returned to the system on free, so the RSS high-water mark sees each run's peak."""
    import ctypes
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD = 128 KiB, no longer adaptive


def rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def sample(tokenizer, rng, size, sam_settings=None, image_id=0):
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pixel_values, grid = qwen_inputs.patchify(image, **tokenizer.image_settings)
    patch = tokenizer.image_settings["patch_size"]
    masks = torch.from_numpy(rng.random((len(PHRASES), int(grid[0, 1]) * patch, int(grid[0, 2]) * patch)) > 0.7).float()
    out = dict(qwen_inputs.build_inputs(tokenizer, grid, PHRASES), pixel_values=pixel_values, image_grid_thw=grid,
               masks=masks, supervised=[True] * len(PHRASES), image_id=image_id)
    if sam_settings:  # the refiner's inputs and targets, as the DataLoader prepares them
        out.update(refiner.sam_image(image, **sam_settings))
        out["sam_masks"] = torch.from_numpy(rng.random((len(PHRASES), *out["sam_size"])) > 0.7)
    return out


def bench_sam_encoders(names, device, repeats):
    """Per SAM_ARCH name: parameters (all; image encoder; prompt encoder + mask decoder) and the frozen image
    encoder's seconds per image (Refiner.image_embeddings of one image, random weights, float32 on CPU, bf16 on GPU)."""
    res = {}
    for name in names:
        with tempfile.TemporaryDirectory() as workdir:
            sam = refiner.load_sam(build_sam(name, workdir), dtype=dtype_for(device), device=device)
        r = refiner.Refiner(sam, hidden_size=8, text_layers=1)
        pixels = torch.zeros(1, 3, r.size, r.size, device=device)
        t, m = timed(lambda: r.image_embeddings(pixels), device, repeats, warmup=0)  # big enough to need none
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        res[name] = dict(family=r.family, params=count(sam), encoder_params=count(sam.vision_encoder),
                         prompt_decoder_params=count(r.prompt_encoder) + count(r.mask_decoder), side=r.size,
                         encoder_s_per_image=t, encoder_peak_added_bytes=m,
                         cached_bytes_fp16=2 * sum(math.prod(s) for s in r.image_shapes.values()))
        print(name, res[name], flush=True)
    return res


def bench_refiner(qwen, tokenizer, sam_name, bs, size, device, repeats, workdir):
    """Training step time and peak memory per sample: U-Net only vs + SAM refiner (batched phrases) vs + refiner with
    F-LMM's per-phrase loop (the same SAM image encoder pass per image in both)."""
    sam_dir = build_sam(sam_name, os.path.join(workdir, "sam"))
    kwargs = build.grounder_kwargs(build.Config(refiner=dict(sam=sam_dir)), qwen.config)
    grounder = build.build_grounder(kwargs, device)
    side = build.sam_settings(grounder)
    rng = np.random.default_rng(1)
    batch = model.to_device(qwen_inputs.collate([sample(tokenizer, rng, size, side, i) for i in range(bs)]), device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    opt = torch.optim.AdamW([p for p in grounder.parameters() if p.requires_grad], lr=1e-4, fused=True)
    per_phrase_refiner = grounder.refiner.forward

    def loop(coarse, embeddings, phrase_image, hidden, sam_sizes, boxes=None):  # F-LMM: one prompt encoder +
        return [per_phrase_refiner([c], embeddings, [i], [h], sam_sizes, None if boxes is None else boxes[k:k + 1])[0]
                for k, (c, i, h) in enumerate(zip(coarse, phrase_image, hidden))]  # decoder per phrase

    def step(refine):
        with autocast:
            if refine:  # + hidden states and SAM's image embeddings from the frozen models, + the refiner
                out = grounder(build.extract(qwen, grounder, batch))
            else:
                out = dict(coarse=grounder.head(model.frozen_outputs(qwen, batch)["maps"]))
            loss = sum(v.sum() for v, _ in heads.losses(out, batch).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    res = {}
    for name, refine, fn in (("unet", False, per_phrase_refiner), ("refiner_batched", True, per_phrase_refiner),
                             ("refiner_per_phrase", True, loop)):
        grounder.refiner.forward = fn
        t, m = timed(lambda: step(refine), device, repeats)
        res[name] = {"step_s": t, "peak_added_bytes": m, "ms_per_sample": 1e3 * t / bs}
    grounder.refiner.forward = per_phrase_refiner
    res["refiner_step_vs_unet"] = res["refiner_batched"]["step_s"] / res["unet"]["step_s"]
    res["batched_speedup_vs_per_phrase"] = res["refiner_per_phrase"]["step_s"] / res["refiner_batched"]["step_s"]
    rows = [(f"step {name}, SAM {sam_name}, batch {bs}", f"{res[name]['ms_per_sample']:.1f} ms/sample",
             f"+{res[name]['peak_added_bytes'] / MB:.0f} MiB", f"{res[name]['step_s'] / res['unet']['step_s']:.2f}x")
            for name in ("unet", "refiner_batched", "refiner_per_phrase")]
    return dict(res, sam=sam_name), rows


def bench_vlm_boxes(qwen, tokenizer, bs, size, device, repeats, new_tokens=vlmbox.MAX_NEW_TOKENS):
    """refiner box=vlm: what asking the VLM for each phrase's box costs (one greedy generate of `new_tokens` tokens,
    forced: random weights would stop anywhere) next to the frozen forward (maps) of the same sentences, batch bs of
    one-phrase sequences. Paid once per sentence at extraction (build.extract), never again from a cache."""
    rng = np.random.default_rng(2)
    samples = [sample(tokenizer, rng, size, image_id=i) for i in range(bs)]
    batch = model.to_device(qwen_inputs.collate([dict(s, **qwen_inputs.build_inputs(tokenizer, s["image_grid_thw"],
                                                                                     PHRASES[:1])) for s in samples]),
                            device)
    prompts = [(*qwen_inputs.prompt_ids(tokenizer, s["image_grid_thw"], vlmbox.question(PHRASES[0], qwen.config.model_type)),
                s["pixel_values"], s["image_grid_thw"]) for s in samples]
    qwen.generation_config.min_new_tokens = new_tokens  # a full-length answer every time
    try:
        t_box, _ = timed(lambda: vlmbox.generate(qwen, tokenizer, prompts, new_tokens), device, repeats, warmup=1)
    finally:
        qwen.generation_config.min_new_tokens = None
    t_fwd, _ = timed(lambda: model.frozen_outputs(qwen, batch), device, repeats)
    res = {"batch": bs, "new_tokens": new_tokens, "boxes_s": t_box, "forward_s": t_fwd,
           "ms_per_sentence": 1e3 * t_box / bs, "boxes_vs_forward": t_box / t_fwd}
    return res, [(f"VLM boxes, batch {bs}, {new_tokens} tokens", f"{1e3 * t_box / bs:.1f} ms/sent",
                  f"forward {1e3 * t_fwd / bs:.1f} ms/sent", f"{t_box / t_fwd:.2f}x")]


def bench_cache(model_dir, root, bs, device, workdir, args):
    """Sequences/s of a full training step (frozen outputs + head + AdamW) from cache.py's files vs online, both in
    the sentence layout on the synthetic images of the loader benchmark; extraction speed; the cached loader alone."""
    spec = dict(kind="refer", data_root=root, dataset="synthetic", split_by="unc", split="train",
                image_dir=os.path.join(root, "images"))
    cfg = build.config_from_dict(dict(model=model_dir, dtype="bfloat16" if device.type == "cuda" else "float32",
                                      layout="sentence", train_data=[spec], batch_size=bs, num_workers=args.workers,
                                      head=dict(base=16, size=16),  # the demo's head: the frozen part dominates
                                      cache_dir=os.path.join(workdir, "cache"), out_dir=os.path.join(workdir, "out")))
    t = time.perf_counter()
    cache.extract_all(cfg, device=device)
    n_sequences = len(build.build_dataset(dataclasses.replace(cfg, protocol="standard"), None, spec, train=False,
                                          settings={}))
    res = {"extract_seq_per_s": n_sequences / (time.perf_counter() - t)}
    qwen, tokenizer = build.build_qwen(cfg, device)
    grounder = build.build_grounder(build.grounder_kwargs(cfg, qwen.config), device)
    opt = torch.optim.AdamW(grounder.parameters(), lr=1e-4, fused=True)  # as train.py
    autocast = build.autocast_for(cfg, device)

    def epoch_rate(loader, qwen):  # one epoch, after 2 warm-up steps
        batching.set_epoch(loader, 0)
        count = 0
        for i, batch in enumerate(loader):
            if i == 2:
                count, t = 0, time.perf_counter()
            batch = model.to_device(batch, device)
            with autocast:
                out = grounder(build.extract(qwen, grounder, batch))
                loss = sum(v.mean() for v, _ in heads.losses(out, batch).values())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            count += len(batch["phrases"])
        sync(device)
        return count / (time.perf_counter() - t)
    res["online_seq_per_s"] = epoch_rate(build.build_train_loader(cfg, tokenizer), qwen)
    from_cache = cached.build_train_loader(dataclasses.replace(cfg, num_workers=0))
    res["cached_seq_per_s"] = epoch_rate(from_cache, None)
    res["cached_vs_online"] = res["cached_seq_per_s"] / res["online_seq_per_s"]
    t, count = time.perf_counter(), sum(len(b["phrases"]) for b in from_cache)
    res["cached_loader_seq_per_s"] = count / (time.perf_counter() - t)
    return res, [(f"extraction, batch {bs} (sequences/s)", f"{res['extract_seq_per_s']:.1f}", "", ""),
                 ("head step from the cache (sequences/s)", f"{res['cached_seq_per_s']:.1f}",
                  f"online {res['online_seq_per_s']:.1f}/s", f"{res['cached_vs_online']:.2f}x"),
                 ("cached loader alone (sequences/s)", f"{res['cached_loader_seq_per_s']:.1f}",
                  f"head needs {res['cached_seq_per_s']:.1f}", "")]


def bench_patchify(ctx):
    """patchify vs the official processor, images/s."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    image = Image.fromarray(ctx.rng.integers(0, 256, (ctx.size[1], ctx.size[0], 3), dtype=np.uint8))
    official = Qwen2VLImageProcessorPil(min_pixels=qwen_inputs.MIN_PIXELS, max_pixels=qwen_inputs.MAX_PIXELS)
    n, cpu = 5 if ctx.quick else 40, torch.device("cpu")
    t_ours, _ = timed(lambda: [qwen_inputs.patchify(image) for _ in range(n)], cpu, ctx.repeats)
    t_hf, _ = timed(lambda: [official(images=image, return_tensors="pt") for _ in range(n)], cpu, ctx.repeats)
    res = {"ours_images_per_s": n / t_ours, "hf_images_per_s": n / t_hf, "speedup_vs_hf": t_hf / t_ours}
    return res, [(f"patchify {ctx.image_size} (images/s)", f"{n / t_ours:.1f}", f"official {n / t_hf:.1f}",
                  f"{t_hf / t_ours:.2f}x")]


def bench_forward(ctx):
    """The frozen forward three ways, batch 1: the floor (stock SDPA, no capture), ours, F-LMM's (eager attention,
    output_attentions, the full model with lm_head)."""
    qwen, device, repeats = ctx.qwen, ctx.device, ctx.repeats
    one = model.to_device(qwen_inputs.collate([sample(ctx.tokenizer, ctx.rng, ctx.size)]), device)
    inputs = {k: one[k] for k in model.MODEL_INPUTS}
    with torch.no_grad():
        stock_sdpa(qwen)  # the floor: stock transformers SDPA everywhere, no capture
        t_floor, m_floor = timed(lambda: qwen.model(**inputs, use_cache=False), device, repeats)
        model.use_fast_attention(qwen)  # ours: one SDPA call per vision block; the same forward, no capture
        t_fast, m_fast = timed(lambda: qwen.model(**inputs, use_cache=False), device, repeats)
        t_ours, m_ours = timed(lambda: model.phrase_attention(qwen, one), device, repeats)
        qwen.set_attn_implementation("eager")  # F-LMM: eager attention, every layer's full S x S map, lm_head
        t_flmm, m_flmm = timed(lambda: qwen(**inputs, output_attentions=True, use_cache=False), device, repeats)
        model.use_fast_attention(qwen)
    res = {"seq_len": int(one["input_ids"].shape[1]), "image_tokens": int(one["mm_token_type_ids"].sum()),
           "floor": {"s": t_floor, "added_bytes": m_floor}, "ours_no_capture": {"s": t_fast, "added_bytes": m_fast},
           "ours": {"s": t_ours, "added_bytes": m_ours}, "flmm": {"s": t_flmm, "added_bytes": m_flmm},
           "capture_time_vs_floor": t_ours / t_floor, "capture_speedup_vs_flmm": t_flmm / t_ours,
           "capture_memory_vs_flmm": m_ours / max(m_flmm, 1)}
    rows = [(name, f"{1e3 * t:.1f} ms", f"+{m / MB:.0f} MiB", f"{t / t_floor:.2f}x") for name, t, m in (
        ("forward: floor (qwen.model, stock SDPA)", t_floor, m_floor), ("forward: our attention, no capture", t_fast,
        m_fast), ("forward: ours (phrase_attention)", t_ours, m_ours),
        ("forward: F-LMM (eager, output_attentions)", t_flmm, m_flmm))]
    return res, rows


def bench_train(ctx, t_flmm):
    """A full training step (frozen forward + capture + U-Net + AdamW) vs the floor, at each batch size; the best
    batch size is what the later sections use."""
    qwen, device, repeats = ctx.qwen, ctx.device, ctx.repeats
    text, vision = qwen.config.text_config, qwen.config.vision_config
    grounder = heads.Grounder(heads.MaskHead(in_channels=text.num_hidden_layers * text.num_attention_heads,
                                             token_px=vision.patch_size * vision.spatial_merge_size)).to(device)
    opt = torch.optim.AdamW(grounder.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    res, rows, best = {}, [], None
    for bs in ctx.batch_sizes:
        batch = model.to_device(qwen_inputs.collate([sample(ctx.tokenizer, ctx.rng, ctx.size) for _ in range(bs)]),
                                device)
        inputs = {k: batch[k] for k in model.MODEL_INPUTS}

        def step():
            with ctx.autocast:
                out = grounder(model.frozen_outputs(qwen, batch))
                loss = sum(heads.phrase_losses(out, batch).values()).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(grounder.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        try:
            with torch.no_grad():
                stock_sdpa(qwen)
                t_f, _ = timed(lambda: qwen.model(**inputs, use_cache=False), device, repeats)
                model.use_fast_attention(qwen)
                t_n, _ = timed(lambda: qwen.model(**inputs, use_cache=False), device, repeats)
                t_c, _ = timed(lambda: model.phrase_attention(qwen, batch), device, repeats)
            t_s, m_s = timed(step, device, repeats)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append((f"train step batch {bs}", "out of memory", "", ""))
            break
        res[bs] = {"step_s": t_s, "floor_s": t_f, "no_capture_s": t_n, "capture_s": t_c, "samples_per_s": bs / t_s,
                   "peak_added_bytes": m_s}
        rows.append((f"train step batch {bs} (samples/s)", f"{bs / t_s:.1f}", f"floor {bs / t_f:.1f}/s",
                     f"{t_s / t_f:.2f}x"))
        if best is None or bs / t_s > res[best]["samples_per_s"]:
            best = bs
    b = res[best]
    res.update(best_batch_size=best, step_time_vs_floor=b["step_s"] / b["floor_s"], samples_per_s=b["samples_per_s"],
               # F-LMM's way is batch 1 by construction; ours batches: per-sample capture time at the best batch size
               capture_speedup_vs_flmm_batched=t_flmm / (b["capture_s"] / best),
               capture_time_vs_our_forward_batched=b["capture_s"] / b["no_capture_s"])
    rows += [(f"capture vs our forward, batch {best}", f"{1e3 * b['capture_s']:.1f} ms",
              f"no capture {1e3 * b['no_capture_s']:.1f} ms", f"{res['capture_time_vs_our_forward_batched']:.2f}x"),
             (f"capture per sample at batch {best}", f"{1e3 * b['capture_s'] / best:.1f} ms", f"F-LMM {1e3 * t_flmm:.1f} ms",
              f"{res['capture_speedup_vs_flmm_batched']:.2f}x faster")]
    return res, rows


def bench_loader(ctx, root, bs, step_rate):
    """The DataLoader with workers vs what the training step consumes. The first epoch starts the (persistent)
    workers, the second is timed, as in training where workers live for the whole run."""
    dataset = batching.build_dataset(dict(kind="refer", data_root=root, dataset="synthetic", split_by="unc",
                                          split="train", image_dir=os.path.join(root, "images")), ctx.tokenizer,
                                     train=True)
    loader = batching.build_loader(dataset, bs, num_workers=ctx.workers, shuffle=True, seed=0, drop_last=True)
    for epoch in range(2):
        batching.set_epoch(loader, epoch)
        t = time.perf_counter()
        rate = sum(len(b["input_ids"]) for b in loader) / (time.perf_counter() - t)
    return {"samples_per_s": rate, "workers": ctx.workers}, [
        (f"DataLoader, {ctx.workers} workers (samples/s)", f"{rate:.1f}", f"step needs {step_rate:.1f}",
         f"{rate / step_rate:.2f}x")]


def cap_sentences(root, out, per_image):
    """A copy of the synthetic dataset at `root` (refer layout) keeping at most `per_image` sentences per image (at
    least one per object): RefCOCO's ~7 where the demo's scenes have ~11. Returns the new data root."""
    import pickle
    import shutil
    os.makedirs(os.path.join(out, "synthetic"), exist_ok=True)
    shutil.copy(os.path.join(root, "synthetic", "instances.json"), os.path.join(out, "synthetic", "instances.json"))
    with open(os.path.join(root, "synthetic", "refs(unc).p"), "rb") as f:
        refs = pickle.load(f)
    used = {}
    for ref in refs:  # objects in file order; an image's budget shared by its objects
        n = used.get(ref["image_id"], 0)
        keep = max(1, min(len(ref["sentences"]), per_image - n))
        ref["sentences"] = ref["sentences"][:keep]
        used[ref["image_id"]] = n + keep
    with open(os.path.join(out, "synthetic", "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f)
    return out


def training_epoch(ctx, cfg, qwen, tokenizer, grounder, draw):
    """(epoch, sentences): epoch() runs one online sentence-layout training epoch (frozen forward, head, loss,
    backward, fused AdamW as train.py) over cfg's train split, sentences drawn per `draw` (one | all), and returns
    the seconds its frozen forwards took; sentences: how many it trains."""
    batches = list(build.build_train_loader(dataclasses.replace(cfg, train_sentences=draw), tokenizer))
    opt = torch.optim.AdamW(grounder.parameters(), lr=1e-4, fused=True)

    def epoch():
        frozen_s = 0.0
        for batch in batches:
            batch = model.to_device(batch, ctx.device)
            t = time.perf_counter()
            frozen = build.extract(qwen, grounder, batch)
            sync(ctx.device)
            frozen_s += time.perf_counter() - t
            out = grounder(frozen)
            sum(v.mean() for v, _ in heads.losses(out, batch).values()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return frozen_s
    return epoch, sum(len(b["ids"]) if "segment_ids" not in b else heads.sentence_count(b) for b in batches)


def bench_packing(ctx, demo_root):
    """One forward per image (packed sentences) vs one per sentence, on the demo's tiny VLM and data: cache.py's
    extraction, the standard-protocol eval and a sentence-layout training epoch (all online), sentences/s and peak
    memory, at the demo's ~11 sentences per image and at RefCOCO's ~7. Training packs an image's sentences of the
    epoch: with train_sentences=all ("train_all") all of them, ~11 or ~7; with one drawn per object ("train", the
    demo's data only: capping the sentences leaves the same draw) ~3.7, one per object. The training epochs of the
    two run alternately (the median of ctx.repeats + 1 pairs after a warm one; train_all ctx.repeats pairs) and report
    their frozen forwards' share: the head's work per phrase is the same either way."""
    import yaml
    import eval as evaluation
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")) as f:
        demo = yaml.safe_load(f)
    res, rows = {}, []
    for label, root in (("demo", demo_root), ("7/image", cap_sentences(demo_root, os.path.join(ctx.workdir, "cap7"), 7))):
        spec = dict(kind="refer", data_root=root, dataset="synthetic", split_by="unc", split="val",
                    image_dir=os.path.join(demo_root, "images"))
        runs, extract, evals = {}, {}, {}
        for name, pack in (("packed", 2048), ("one_per_sentence", 0)):
            cfg = build.config_from_dict(dict(
                model="tiny", tiny_model=demo["tiny_model"], head=demo["head"], vision_features=True, dtype="float32",
                min_pixels=demo.get("min_pixels", 0),
                synthetic=dict(root=os.path.join(ctx.workdir, "demo_model")), layout="sentence", train_data=[spec],
                val_data=[spec], batch_size=4, num_workers=0, pack_tokens=pack, out_dir=os.path.join(ctx.workdir, "out")))
            qwen, tokenizer = build.build_qwen(cfg, ctx.device)
            grounder = build.build_grounder(build.grounder_kwargs(cfg, qwen.config), ctx.device)
            n = len(build.build_dataset(dataclasses.replace(cfg, pack_tokens=0), None, spec, train=False, settings={}))
            res.setdefault(label, {})[name] = {"sentences": n}
            name_k = os.path.join(ctx.workdir, f"cache_{label.replace('/', '')}_{pack}_") + "{}"
            caches = map(name_k.format, itertools.count())  # bound now (a generator would read pack when run)
            extract[name] = whole(lambda cfg=cfg, caches=caches: cache.extract_all(  # a fresh cache_dir each call
                dataclasses.replace(cfg, cache_dir=next(caches)), device=ctx.device))
            (loader, _), = build.build_val_loaders(cfg, tokenizer, cfg.val_data).values()
            evaluation.evaluate(qwen, grounder, loader, ctx.device, max_batches=2)  # warm-up: first-call costs
            evals[name] = whole(lambda q=qwen, g=grounder, loader=loader: evaluation.evaluate(q, g, loader, ctx.device))
            runs[name] = (cfg, qwen, tokenizer, grounder)
        for what, fns in (("extract", extract), ("eval", evals)):  # alternately, 2 each: a few seconds apiece
            for name, (t, _, m) in interleaved(fns, ctx.device, repeats=2, warmup=0).items():
                r = res[label][name]
                r[f"{what}_sent_per_s"], r[f"{what}_peak_added_bytes"] = r["sentences"] / t, m
        p, u = res[label]["packed"], res[label]["one_per_sentence"]
        trains = (("train", "one"), ("train_all", "all")) if label == "demo" else (("train_all", "all"),)
        for what, draw in trains:
            epochs = {name: training_epoch(ctx, *run, draw) for name, run in runs.items()}
            repeats, warmup = (ctx.repeats + 1, 1) if draw == "one" else (ctx.repeats, 0)  # all: warm from before
            timings = interleaved({name: fn for name, (fn, _) in epochs.items()}, ctx.device, repeats, warmup)
            for name, (t, frozen_s, m) in timings.items():
                r = res[label][name]
                r[f"{what}_sentences"] = epochs[name][1]  # what the epoch trains: the same packed or not
                r[f"{what}_sent_per_s"], r[f"{what}_peak_added_bytes"] = epochs[name][1] / t, m
                r[f"{what}_frozen_share"] = frozen_s / t
            res[label][f"{what}_frozen_speedup"] = timings["one_per_sentence"][1] / timings["packed"][1]
        for what in ("extract", "eval") + tuple(what for what, _ in trains):
            res[label][f"{what}_speedup"] = p[f"{what}_sent_per_s"] / u[f"{what}_sent_per_s"]
            rows.append((f"{what}, {label}, packed (sentences/s)", f"{p[f'{what}_sent_per_s']:.1f}",
                         f"one each {u[f'{what}_sent_per_s']:.1f}/s", f"{res[label][f'{what}_speedup']:.2f}x"))
            rows.append((f"{what}, {label}, peak memory packed", f"+{p[f'{what}_peak_added_bytes'] / MB:.0f} MiB",
                         f"one each +{u[f'{what}_peak_added_bytes'] / MB:.0f} MiB", ""))
            if what.startswith("train"):  # the ceiling: the frozen forwards alone; the head costs the same both ways
                rows.append(("  its frozen forwards: share of the epoch", f"{100 * p[f'{what}_frozen_share']:.0f}%",
                             f"one each {100 * u[f'{what}_frozen_share']:.0f}%",
                             f"{res[label][f'{what}_frozen_speedup']:.2f}x"))
    return res, rows


def bench_packing_model(ctx, per_image=7):
    """The packing section for `--model <arch or checkpoint>` (a GPU): the frozen forward with the capture (what
    extraction and the standard-protocol eval run) on ctx.size random images of `per_image` sentences each, packed
    behind one image prefix vs one sequence per sentence, alternately, at each batch size (images): sentences/s and
    added peak memory. The full training step on packed rows is `--sections train` (which packs nothing) plus the head."""
    settings, phrases = ctx.tokenizer.image_settings, [PHRASES[i % len(PHRASES)] for i in range(per_image)]
    res, rows = {"per_image": per_image}, []
    for bs in ctx.batch_sizes:
        images = [Image.fromarray(ctx.rng.integers(0, 256, (ctx.size[1], ctx.size[0], 3), dtype=np.uint8))
                  for _ in range(bs)]
        r, forwards = res.setdefault(f"batch_{bs}", {}), {}
        for name, pack in (("packed", 2048), ("one_per_sentence", 0)):
            samples = [s for i, image in enumerate(images)
                       for s in batching.picture_samples(ctx.tokenizer, settings, image, phrases, i, pack_tokens=pack)]
            batch = model.to_device(qwen_inputs.collate(samples), ctx.device)
            r[name] = dict(sequences=len(samples), tokens=int(batch["attention_mask"].sum()))

            def forward(batch=batch):
                with ctx.autocast:
                    model.frozen_outputs(ctx.qwen, batch, vision=True)
            forwards[name] = whole(forward)
        for name, (t, _, m) in interleaved(forwards, ctx.device, ctx.repeats, warmup=2).items():
            r[name].update(sent_per_s=bs * per_image / t, peak_added_bytes=m)
        p, u = r["packed"], r["one_per_sentence"]
        r["speedup"] = p["sent_per_s"] / u["sent_per_s"]
        rows.append((f"frozen forward, {per_image}/image, batch {bs} (sent/s)", f"{p['sent_per_s']:.1f}",
                     f"one each {u['sent_per_s']:.1f}/s", f"{r['speedup']:.2f}x"))
        rows.append(("  peak memory added, tokens packed", f"+{p['peak_added_bytes'] / MB:.0f} MiB, {p['tokens']}",
                     f"+{u['peak_added_bytes'] / MB:.0f} MiB, {u['tokens']}", ""))
    return res, rows


SECTIONS = ("patchify", "forward", "train", "packing", "refiner", "boxes", "loader", "cache")
DEFAULT = ("patchify", "forward", "train", "packing")  # about 3 minutes on 2 CPU cores


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help=f"tiny | {' | '.join(ARCH)} | a local checkpoint directory")
    parser.add_argument("--out", default=None, help="write the raw numbers here as JSON")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_sizes", default="1,4")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers for the loader benchmark")
    parser.add_argument("--image_size", default="640x480", help="WxH of the benchmark images (640x480: 391 tokens)")
    parser.add_argument("--quick", action="store_true", help="one repeat, batch 1 only (keeps the script working)")
    parser.add_argument("--sections", default=",".join(DEFAULT),
                        help=f"comma-separated, from {','.join(SECTIONS)} or all (default: {','.join(DEFAULT)})")
    parser.add_argument("--sam", default="tiny", choices=list(SAM_ARCH),
                        help="SAM for the refiner section (random weights): tiny, vit_l (F-LMM's), sam2_l, ...")
    parser.add_argument("--sam_encoders", default=None, help="only time these SAM_ARCH image encoders (comma-separated)")
    args = parser.parse_args()
    sections = SECTIONS if args.sections == "all" else tuple(args.sections.split(","))
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {list(SECTIONS)} or all")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        fixed_mmap_threshold()
        torch.set_num_threads(1)  # steadier on small shared machines (DESIGN.md); the ratios are what matter
    if args.sam_encoders:  # a mode of its own: no VLM
        res = bench_sam_encoders(args.sam_encoders.split(","), device, 1 if args.quick else args.repeats)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        return res
    workdir = tempfile.mkdtemp()
    qwen, tokenizer = build_model(args.model, device, workdir)
    ctx = argparse.Namespace(
        qwen=qwen, tokenizer=tokenizer, device=device, workdir=workdir, rng=np.random.default_rng(0),
        size=tuple(int(v) for v in args.image_size.split("x")), image_size=args.image_size, quick=args.quick,
        repeats=1 if args.quick else args.repeats, workers=args.workers,
        batch_sizes=[1] if args.quick else [int(b) for b in args.batch_sizes.split(",")],
        autocast=torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
           "model": args.model, "dtype": str(dtype_for(device)), "torch": torch.__version__, "sections": sections}
    rows = []

    def section(name, fn, *a):
        if name in sections:
            res[name], r = fn(*a)
            rows.extend(r)
    section("patchify", bench_patchify, ctx)
    section("forward", bench_forward, ctx)  # "train" needs it: F-LMM's batch-1 time
    if "train" in sections and "forward" not in sections:
        raise SystemExit("--sections: train compares with F-LMM's batch-1 forward: add forward")
    section("train", bench_train, ctx, res.get("forward", {}).get("flmm", {}).get("s"))
    best = res["train"]["best_batch_size"] if "train" in res else ctx.batch_sizes[-1]
    n_images = 16 if args.quick else max(128, 4 * best * max(1, args.workers))
    root = synthetic.make_synthetic(os.path.join(workdir, "synthetic"), seed=0, num_train=n_images, num_val=0,
                                    num_test=0, size=ctx.size)
    if args.model != "tiny":  # this model, 7 sentences per image
        section("packing", bench_packing_model, ctx)
    elif "packing" in sections:  # the demo's scenes: 224 px, ~11 sentences each
        demo_root = synthetic.make_synthetic(os.path.join(workdir, "demo"), seed=0, num_train=0,
                                             num_val=4 if args.quick else 20, num_test=0)
        res["packing"], r = bench_packing(ctx, demo_root)
        rows.extend(r)
    section("refiner", bench_refiner, qwen, tokenizer, args.sam, best, ctx.size, device, ctx.repeats, workdir)
    section("boxes", bench_vlm_boxes, qwen, tokenizer, best, ctx.size, device, ctx.repeats)
    section("loader", bench_loader, ctx, root, best, res.get("train", {}).get("samples_per_s", float("nan")))
    model_dir = os.path.join(workdir, "tiny") if args.model == "tiny" else args.model
    if os.path.isdir(model_dir):
        section("cache", bench_cache, model_dir, root, best, device, workdir, args)

    print(f"\n{res['device']} | {args.model} | {res['dtype']} | sections {','.join(sections)}")
    for r in rows:
        print(f"{r[0]:<48} {r[1]:>14} {r[2]:>22} {r[3]:>8}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
