"""Train the F-LMM mask head (and SAM refiner) on a frozen Qwen VLM's phrase->image attention: the training loop.

    python train.py --cfg configs/demo.yaml                      # CPU, tiny model, synthetic data, minutes
    python train.py --cfg configs/refcoco.yaml                   # one GPU
    torchrun --nproc_per_node=8 train.py --cfg configs/refcoco.yaml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py --cfg ...
    python train.py --cfg configs/refcoco.yaml resume=true       # continue exactly where out_dir/ckpt.pt stopped

Only the Grounder (head, refiner) trains; the VLM's weights are never touched and never saved.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import time

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import batching
import build
import cache
import cached
import draw
import eval as evaluation
import ground
import head as heads
import metrics as scoring
import model
import vlmbox
from build import print0


def peak_lr(cfg, world):
    """cfg.lr, scaled by sqrt(global batch / lr_batch) when lr_batch is set (Adam's square-root rule)."""
    global_batch = cfg.batch_size * cfg.grad_accum * world
    return cfg.lr * math.sqrt(global_batch / cfg.lr_batch) if cfg.lr_batch else cfg.lr


def lr_at(step, total, cfg, peak=None):
    """Linear warm-up over cfg.warmup of the steps, then cosine decay to 0, from `peak` (default cfg.lr)."""
    peak = cfg.lr if peak is None else peak
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def micro_batches(loader, start):
    """Endless micro-batches from micro-batch `start` on: epoch e's order depends only on (seed, e)."""
    epoch, offset = divmod(start, len(loader))
    while True:
        batching.set_epoch(loader, epoch, start_batch=offset)
        yield from loader
        epoch, offset = epoch + 1, 0


def save_checkpoint(path, state):
    """Atomic: write a temp file beside the target, then rename, so a crash never leaves a truncated ckpt.pt."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def start_run(cfg, world, master):
    """The checkpoint to resume from (None for a fresh run), after the checks that must come before any model loads.
    A fresh run replaces an old run's log.jsonl and tb/ in out_dir; a resumed one keeps the log up to its step."""
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    ckpt = None
    if cfg.resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"resume=true but {ckpt_path} does not exist: nothing to resume (drop resume=true to "
                             f"start afresh)")
        ckpt = build.load_checkpoint(ckpt_path)
        if ckpt["world"] != world:  # rank r reads samples r, r + world, ...: another world size is another order
            raise SystemExit(f"{ckpt_path} was written by {ckpt['world']} process(es), this run has {world}: resume "
                             f"with the same number of processes (the data order and RNG streams depend on it)")
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if ckpt is None and (os.path.exists(log_path) or os.path.isdir(os.path.join(cfg.out_dir, "tb"))):
            print0(f"{cfg.out_dir} holds an earlier run: its log.jsonl and tb/ are replaced")
            shutil.rmtree(os.path.join(cfg.out_dir, "tb"), ignore_errors=True)
            open(log_path, "w").close()
        if ckpt is not None and os.path.exists(log_path):  # steps logged after the checkpoint are redone
            with open(log_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= ckpt["step"]]
            with open(log_path, "w") as f:
                f.writelines(kept)
    return ckpt


def check_finite(recent, ckpt_path, device):
    """Raise on the first non-finite loss of `recent` (step, sample ids, loss tensor). One host sync for all of
    them, taken where the loop syncs anyway (log line, checkpoint), not once per step. Under DDP every rank calls
    it at the same steps and all of them stop together (a rank that raised alone would leave the others waiting)."""
    losses = torch.stack([loss for _, _, loss in recent]) if recent else torch.zeros(0, device=device)
    bad = (~torch.isfinite(losses)).any().to(torch.int32)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if not bad:
        return
    for (step, ids, loss), ok in zip(recent, torch.isfinite(losses).tolist()):
        if not ok:
            raise RuntimeError(f"non-finite loss {loss.item()} at step {step}, samples {ids}; the last good "
                               f"checkpoint is {ckpt_path}")
    raise RuntimeError(f"another rank stopped on a non-finite loss (its error names the step and samples); the last "
                       f"good checkpoint is {ckpt_path}")


def step_counts(micro, device):
    """(supervised phrases, sequences) in this optimiser step over every micro-batch and rank: each loss term divides
    by its own count, so that grad_accum x batch_size on N processes gives the gradient of one batch of all of them."""
    phrases = sum(sum(map(bool, s)) for b in micro for s in b.get("supervised", []))
    n = torch.tensor([float(phrases), float(sum(heads.sentence_count(b) for b in micro))], device=device)
    if dist.is_initialized():
        dist.all_reduce(n)
    return dict(phrase=n[0].clamp(min=1), sequence=n[1].clamp(min=1))


def idle_backward(qwen, grounder, good, device):
    """A rank whose micro-batch held no usable sample (skip_bad) still joins what the other ranks run, instead of
    leaving them waiting: the sharded VLM's forward (shard: true; on `good`, this rank's last usable batch, the
    result discarded, as eval's lockstep does) and DDP's gradient all-reduce (a zero-weighted forward/backward on
    dummy inputs)."""
    if model.sharded(qwen):
        if good is None:
            raise RuntimeError("shard: true with skip_bad: this rank's first micro-batch held no readable sample, so "
                               "it has no batch to join the other ranks' sharded forward with; fix or drop the files")
        build.extract(qwen, grounder, good)
    module = grounder.module if isinstance(grounder, DDP) else grounder
    out = grounder(module.dummy_inputs(device))
    (sum(x.sum() for xs in out.values() for x in xs) * 0).backward()


def log_line(cfg, writer, step, terms, lr, grad_norm, rate):
    """Average the summed loss terms since the last line (one host sync), then tensorboard, log.jsonl and tqdm.
    terms: {name: (2,) sum and count} on the device, the same names on every rank (heads.loss_names)."""
    stacked = torch.stack(list(terms.values()))  # (terms, 2)
    if dist.is_initialized():
        dist.all_reduce(stacked)
    means = dict(zip(terms, (stacked[:, 0] / stacked[:, 1].clamp(min=1)).tolist()))
    scalars = dict(loss=sum(means.values()), **means, lr=lr, grad_norm=float(grad_norm), samples_per_s=rate)
    if writer is not None:
        for name, v in scalars.items():
            writer.add_scalar(f"train/{name}", v, step)
        with open(os.path.join(cfg.out_dir, "log.jsonl"), "a") as f:  # the same numbers as plain text
            f.write(json.dumps(dict(step=step, **scalars)) + "\n")
    return scalars


def save_step(path, grounder, optimizer, kwargs, step, world, resolved):
    """Every rank's RNG state gathered, then rank 0 writes the checkpoint (head, optimizer, step, config)."""
    rng = [torch.get_rng_state() for _ in range(world)]
    if dist.is_initialized():
        dist.all_gather_object(rng, torch.get_rng_state())
    if int(os.environ.get("RANK", 0)) == 0:
        save_checkpoint(path, dict(grounder=grounder.state_dict(), grounder_kwargs=kwargs, step=step, rng=rng,
                                   world=world, optimizer=optimizer.state_dict(), config=resolved))


def periodic_eval(qwen, grounder, val_loaders, device, autocast, cfg, writer, step, heads_per_layer):
    metrics = evaluation.evaluate_all(qwen, grounder, val_loaders, device, autocast, cfg.eval_batches)
    for name, m in metrics.items():
        print0(f"step {step} {name}: " + " ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "n"))
        for k, v in m.items():
            if writer is not None:
                writer.add_scalar(f"eval/{name}/{k}", v, step)
    board_maps(qwen, grounder, val_loaders, device, autocast, cfg, writer, step, heads_per_layer)


def board_maps(qwen, grounder, val_loaders, device, autocast, cfg, writer, step, heads_per_layer):
    """Tensorboard: what the VLM attends to for the first val phrases (ground.loader_pictures), at every eval."""
    if cfg.vis_every and val_loaders and (writer is not None or model.sharded(qwen)):  # sharded: all ranks run
        loader, _ = next(iter(val_loaders.values()))
        picture = ground.loader_pictures(qwen, grounder, loader, device, heads_per_layer, autocast=autocast)
        if writer is not None:
            writer.add_image("eval/attention_maps", picture, step, dataformats="HWC")


def train(cfg, device, rank=0, world=1):
    """One training run of cfg (model, data, loop, final eval) -> (final val metrics {split: {metric: value}}, the
    trained Grounder). Call inside an initialised process group when world > 1 (main does), after start_job."""
    ddp, master = world > 1, rank == 0
    resolved = dataclasses.asdict(cfg)
    ckpt = start_run(cfg, world, master)
    build.check_data(cfg, cfg.train_data + cfg.val_data)
    if master:
        with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(resolved, f, sort_keys=False)

    # from a cache the frozen outputs are read from cache.py's files: the VLM never loads
    qwen, tokenizer = (None, None) if cfg.cache_dir else build.build_qwen(cfg, device)
    torch.manual_seed(cfg.seed)  # the same initialisation on every rank
    config = cache.model_config(cfg) if cfg.cache_dir else qwen.config
    kwargs = build.grounder_kwargs(cfg, config)
    grounder = build.build_grounder(kwargs, device, encoder=not cfg.cache_dir)  # cached: SAM's encoder never runs
    if cfg.cache_dir:
        loader, val_loaders = cached.build_train_loader(cfg), cached.build_val_loaders(cfg, cfg.val_data)
    else:
        loader = build.build_train_loader(cfg, tokenizer, build.sam_settings(grounder))
        val_loaders = build.build_val_loaders(cfg, tokenizer, cfg.val_data, build.sam_settings(grounder))
    steps_per_epoch = len(loader) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(loader.dataset)} training images make no full step of batch_size {cfg.batch_size} x "
                         f"grad_accum {cfg.grad_accum} on {world} process(es): lower batch_size or grad_accum")
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))

    peak = peak_lr(cfg, world)
    optimizer = torch.optim.AdamW([p for p in grounder.parameters() if p.requires_grad], lr=peak, betas=cfg.betas,
                                  weight_decay=cfg.weight_decay, fused=True)  # one kernel: ~8x faster on a CPU too
    n_train = sum(p.numel() for p in grounder.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in grounder.frozen_parameters())
    frozen = f"{config.model_type} read from {cfg.cache_dir}" if qwen is None else config.model_type
    if qwen is not None:
        n_frozen += sum(p.numel() for p in qwen.parameters())
    print0(f"trainable {n_train / 1e6:.2f}M (grounder) | frozen {n_frozen / 1e6:.1f}M ({frozen}"
           f"{' + SAM image encoder' if grounder.refiner is not None else ''}) | "
           f"{len(loader.dataset)} training images, {steps_per_epoch} steps/epoch, {total} steps | global batch "
           f"{cfg.batch_size * cfg.grad_accum * world} images ({cfg.batch_size} x {cfg.grad_accum} accum x {world} "
           f"process(es)), peak lr {peak:.3g}" + (f" (= {cfg.lr:g} x sqrt({cfg.batch_size * cfg.grad_accum * world}"
                                                   f" / {cfg.lr_batch}))" if cfg.lr_batch else ""))
    step, ckpt_path = 0, os.path.join(cfg.out_dir, "ckpt.pt")
    if ckpt is not None:
        if ckpt["grounder_kwargs"] != kwargs:
            raise SystemExit(f"{ckpt_path}: built with {ckpt['grounder_kwargs']}, this config gives {kwargs}")
        heads.load_state(grounder, ckpt["grounder"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"][rank])
        print0(f"resumed from {ckpt_path} at step {step} of {total}")
    trained = DDP(grounder, device_ids=[device.index] if device.type == "cuda" else None) if ddp else grounder
    autocast = build.autocast_for(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=(device.type == "cuda" and cfg.dtype == "float16"))
    writer = None
    if master:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(cfg.out_dir, "tb"))

    batches = micro_batches(loader, step * cfg.grad_accum)  # resumes mid-epoch in the same seeded order
    bar = tqdm(total=total, initial=step, disable=not master, dynamic_ncols=True, file=sys.stdout, mininterval=2)
    t0, seen, skipped, good = time.time(), 0, set(), None  # good: the last usable micro-batch (idle_backward)
    recent = []  # (step, sample ids, loss) since the last finiteness check
    names = heads.loss_names(grounder)
    terms = {name: torch.zeros(2, device=device) for name in names}  # sum and count of each term since the last line
    while step < total:
        lr = lr_at(step, total, cfg, peak)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cfg.eval_every and step and step % cfg.eval_every == 0 and val_loaders:
            periodic_eval(qwen, trained, val_loaders, device, autocast, cfg, writer, step,
                          config.text_config.num_attention_heads)

        grounder.train()
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        counts = step_counts(micro, device)
        for k, batch in enumerate(micro):
            skipped.update(batch["skipped"])
            sync = contextlib.nullcontext() if not ddp or k == cfg.grad_accum - 1 else trained.no_sync()
            with sync:
                if "phrases" not in batch:  # every sample of this micro-batch was bad (skip_bad): nothing to learn
                    if ddp:
                        idle_backward(qwen, trained, good, device)
                    continue
                seen += len(batch["phrases"])
                batch = good = model.to_device(batch, device)
                with autocast:
                    out = trained(build.extract(qwen, grounder, batch))
                    parts = heads.losses(out, batch)  # name -> (per-item values, "phrase" | "sequence")
                    # DDP averages over ranks: * world undoes it
                    loss = sum(v.sum() / counts[unit] for v, unit in parts.values()) * world
                recent.append((step, batch["ids"], loss.detach()))
                scaler.scale(loss).backward()
            for name, (v, _) in parts.items():
                terms[name] += torch.stack([v.detach().float().sum(), v.new_tensor(float(v.numel()))])
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(grounder.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        last = step == total
        if step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or last:
            check_finite(recent, ckpt_path, device)  # before any checkpoint: a non-finite step is never saved
            recent = []
        if step % cfg.log_every == 0 or last:
            scalars = log_line(cfg, writer, step, terms, lr, grad_norm, seen * world / (time.time() - t0))
            bar.set_postfix(loss=f"{scalars['loss']:.3f}", lr=f"{lr:.1e}", samples_s=f"{scalars['samples_per_s']:.1f}")
            terms = {name: torch.zeros(2, device=device) for name in names}
            t0, seen = time.time(), 0
        if writer is not None and cfg.vis_every and step % cfg.vis_every == 0 and "pixel_values" in batch:
            picture = draw.overlay_grid(batch, out, build.image_settings(cfg, tokenizer))
            writer.add_image("train/pred_vs_true", picture, step, dataformats="HWC")
        if step % cfg.ckpt_every == 0 or last:
            save_step(ckpt_path, grounder, optimizer, kwargs, step, world, resolved)
    bar.close()

    if skipped:
        print0(f"skipped {len(skipped)} unreadable sample(s) during training (skip_bad=true), e.g. {sorted(skipped)[0]}")
    metrics = evaluation.report(qwen, grounder, val_loaders, device, autocast, cfg.out_dir, cfg.vis_samples, writer,
                                step)
    board_maps(qwen, grounder, val_loaders, device, autocast, cfg, writer, step, config.text_config.num_attention_heads)
    if writer is not None:
        writer.close()
    if vlmbox.report():
        print0(vlmbox.report())
    print0(f"checkpoint: {ckpt_path}")
    return metrics, grounder


def main(cfg):
    rank, world, device = build.start_job(cfg)
    build.print_config(cfg)
    try:
        with build.one_line_data_errors():
            metrics = run(cfg, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return metrics


def run(cfg, rank, world, device):
    """train.py's job: extraction when cfg.cache_dir is set (what is missing, nothing after the first run), the
    training run, and with cfg.baselines the constant-phrase ablation and the baselines table."""
    if cfg.cache_dir:
        cache.extract_all(cfg, rank, world, device)
    metrics, _ = train(cfg, device, rank, world)
    if cfg.baselines:  # what the head would score without language, and a random object of the image
        ablation = dataclasses.replace(cfg, constant_phrase=cfg.baseline_phrase, baselines=False, resume=False,
                                       vis_samples=0, out_dir=os.path.join(cfg.out_dir, "constant_phrase"),
                                       cache_dir=f"{cfg.cache_dir.rstrip('/')}_constant_phrase" if cfg.cache_dir else "")
        print0(f"\nbaseline: the same head trained with every expression replaced by {cfg.baseline_phrase!r} "
               f"(out_dir={ablation.out_dir}, otherwise the config above)")
        if ablation.cache_dir:  # its own cache: the phrase is part of what was extracted
            cache.extract_all(ablation, rank, world, device)
        constant, _ = train(ablation, device, rank, world)
        unet = None
        if cfg.refiner:  # what the refiner adds: the same U-Net trained alone for the same epochs
            alone = dataclasses.replace(ablation, constant_phrase="", refiner={},
                                        out_dir=os.path.join(cfg.out_dir, "unet_alone"),
                                        cache_dir=f"{cfg.cache_dir.rstrip('/')}_unet" if cfg.cache_dir else "")
            print0(f"\nbaseline: the U-Net alone (refiner={{}}, out_dir={alone.out_dir}, otherwise as above)")
            if alone.cache_dir:
                cache.extract_all(alone, rank, world, device)
            unet, _ = train(alone, device, rank, world)
        if rank == 0:
            print0("\ngrounding vs the baselines:")
            table = scoring.baselines_table(cfg.val_data, cfg.protocol, cfg.seed, metrics, constant, unet)
            with open(os.path.join(cfg.out_dir, "baselines.json"), "w") as f:
                json.dump(table, f, indent=1)
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default=None, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. batch_size=8 resume=true")
    args = parser.parse_args()
    cfg = build.load_config(args.cfg, args.overrides)
    if int(os.environ.get("RANK", 0)) == 0:  # the command behind the run, for export.py's model card
        os.makedirs(cfg.out_dir, exist_ok=True)
        world = int(os.environ.get("WORLD_SIZE", 1))
        launcher = f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)}" if world > 1 else "python"
        with open(os.path.join(cfg.out_dir, "commands.txt"), "a" if cfg.resume else "w") as f:
            f.write(f"{launcher} {shlex.join(sys.argv)}\n")
    main(cfg)
