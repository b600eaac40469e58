"""Train the F-LMM mask head on a frozen Qwen2.5-VL's phrase->image attention.

    python train.py --cfg configs/demo.yaml                      # CPU, tiny model, synthetic data, minutes
    python train.py --cfg configs/refcoco.yaml                   # one GPU
    torchrun --nproc_per_node=8 train.py --cfg configs/refcoco.yaml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py --cfg ...
    python train.py --cfg configs/refcoco.yaml resume=true       # continue exactly where out_dir/ckpt.pt stopped

Only the head trains; the VLM's weights are never touched and never saved.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import eval as evaluation
import model
import synthetic


@dataclass
class Config:
    # model
    model: str = "Qwen/Qwen2.5-VL-3B-Instruct"  # local dir or Hub id; "tiny" builds the demo model (seeded) once
    tiny_model: dict = field(default_factory=dict)  # model.build_tiny_qwen kwargs when model == "tiny"
    dtype: str = "bfloat16"  # frozen VLM weights and autocast on CUDA (bfloat16|float16|float32); CPU: float32
    head: dict = field(default_factory=dict)  # MaskHead kwargs beyond the channels (base, size)
    vision_features: bool = False  # also feed the frozen vision tower's patch features to the head's decoder
    # data
    synthetic: dict = field(default_factory=dict)  # synthetic.make_synthetic kwargs; written once, then reused
    train_data: list = field(default_factory=list)  # data.build_dataset specs, mixed by concatenation
    val_data: list = field(default_factory=list)  # specs scored by the periodic eval and at the end
    test_data: list = field(default_factory=list)  # specs eval.py scores (default: val_data)
    protocol: str = "standard"  # eval protocol: standard (every sentence) or flmm (first sentence, per image)
    constant_phrase: str = ""  # ablation: every expression replaced by this text (no language -> saliency only)
    min_pixels: int = 3136  # smart_resize bounds, as Qwen2.5-VL-Instruct's preprocessor_config.json
    max_pixels: int = 12845056
    max_length: int = 4096  # longest token sequence allowed (a clear error above it)
    skip_bad: bool = False  # skip and count broken images / annotations instead of stopping
    num_workers: int = 4  # DataLoader workers per process: decode, patchify, tokenize, masks
    # optimisation (F-LMM's recipe)
    batch_size: int = 16  # images per process per micro-step; all referred objects of an image in one sequence
    grad_accum: int = 1  # micro-steps per optimiser step
    epochs: float = 8.0
    max_steps: int = 0  # > 0 overrides epochs
    lr: float = 1.0e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    warmup: float = 0.03  # fraction of the steps with linear warm-up, then cosine to 0
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: torch's default); 1 is often fastest for tiny models on small CPUs
    # bookkeeping
    out_dir: str = "out/refcoco"
    resume: bool = False  # continue from out_dir/ckpt.pt (same data order, RNG, optimizer, scheduler, step)
    log_every: int = 10  # steps between log lines (loss averaged over them), tensorboard scalars, non-finite checks
    eval_every: int = 2000  # steps between periodic evals (0: only at the end)
    eval_batches: int = 0  # > 0: cap the periodic eval at this many batches (the final eval scores everything)
    ckpt_every: int = 500  # steps between checkpoints (always at the end)
    vis_every: int = 500  # steps between tensorboard images of predicted vs true masks (0: never)
    vis_samples: int = 4  # overlay PNGs of the first val samples written to out_dir/vis at the end
    baselines: bool = False  # demo: also score a random object and train the constant-phrase ablation
    baseline_phrase: str = "the object"  # the constant phrase of that ablation


def config_from_dict(raw, where="config"):
    """dict -> Config. Unknown keys and values of the wrong type are errors; 1e-4 (a string to PyYAML) is coerced."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise SystemExit(f"{where}: unknown config keys {unknown}; known: {sorted(fields)}")
    defaults, out = Config(), {}
    for key, value in raw.items():
        kind = type(getattr(defaults, key))
        if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                value = float(value)
            except ValueError:
                pass
        if kind is tuple and isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            raise SystemExit(f"{where}: {key} must be {kind.__name__}, got {value!r}")
        out[key] = value
    return Config(**out)


def load_config(path=None, overrides=()):
    """YAML file + key=value overrides (values parsed as YAML) -> Config."""
    raw = {}
    if path:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r} is not key=value")
        raw[key] = yaml.safe_load(value)
    return config_from_dict(raw, path or "overrides")


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def lr_at(step, total, cfg):
    """Linear warm-up over cfg.warmup of the steps, then cosine decay to 0."""
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def build_qwen(cfg, device):
    """The frozen VLM and its tokenizer; "tiny" writes the demo model once (seeded) and loads it back."""
    dtype = getattr(torch, cfg.dtype) if device.type == "cuda" else torch.float32
    path = cfg.model
    if path == "tiny":  # one directory per build_tiny_qwen kwargs: another tiny_model never reuses a stale one
        tag = hashlib.sha1(json.dumps(cfg.tiny_model, sort_keys=True).encode()).hexdigest()[:8]
        path = os.path.join(cfg.synthetic.get("root", "data/synthetic"), f"tiny_qwen-{tag}")
        if not os.path.exists(os.path.join(path, "config.json")) and int(os.environ.get("RANK", 0)) == 0:
            model.build_tiny_qwen(path, synthetic.synthetic_texts(), **cfg.tiny_model)
        if dist.is_initialized():
            dist.barrier()
    return model.load_qwen(path, dtype=dtype, device=device)


def build_head(cfg, qwen):
    """The MaskHead for this VLM: L*H attention channels, plus the vision width when vision_features is on."""
    text, vision = qwen.config.text_config, qwen.config.vision_config
    kwargs = dict(in_channels=text.num_hidden_layers * text.num_attention_heads,
                  vision_channels=vision.hidden_size if cfg.vision_features else 0, **cfg.head)
    return model.MaskHead(**kwargs), kwargs


def autocast_for(cfg, device):
    """bf16 (or fp16) autocast on CUDA; float32 and the CPU run without."""
    if device.type == "cuda" and cfg.dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, cfg.dtype))
    return contextlib.nullcontext()


def build_data(cfg, tokenizer, spec, train):
    kw = dict(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, skip_bad=cfg.skip_bad, max_length=cfg.max_length,
              seed=cfg.seed, constant_phrase=cfg.constant_phrase or None)
    return data.build_dataset(spec, tokenizer, train=train, protocol=cfg.protocol, **kw)


def build_val_loaders(cfg, tokenizer, specs):
    """{split name: (loader, spec)} for eval, in the config's order."""
    loaders = {}
    for spec in specs:
        dataset = build_data(cfg, tokenizer, spec, train=False)
        loaders[data.spec_name(spec)] = (data.build_loader(dataset, cfg.batch_size, num_workers=cfg.num_workers),
                                         spec)
    return loaders


def evaluate_all(grounder, loaders, device, autocast, max_batches=0):
    return {name: evaluation.evaluate(grounder, loader, device, spec["kind"], autocast, max_batches)
            for name, (loader, spec) in loaders.items()}


def micro_batches(loader, start):
    """Endless micro-batches from micro-batch `start` on: epoch e's order depends only on (seed, e)."""
    epoch, offset = divmod(start, len(loader))
    while True:
        data.set_epoch(loader, epoch, skip=offset)
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


def idle_backward(grounder, device):
    """A zero-weighted head forward/backward on a dummy map: a rank whose micro-batch held no usable sample
    (skip_bad) still joins DDP's gradient all-reduce instead of leaving the other ranks waiting in it."""
    head = grounder.head.module if isinstance(grounder.head, DDP) else grounder.head
    maps = [torch.zeros(head.in_channels, 1, 1, device=device)]
    feats = [torch.zeros(head.vision_channels, 2, 2, device=device)] if head.vision_channels else None
    (grounder.head(maps, feats)[0].sum() * 0).backward()


def train(cfg, device, rank=0, world=1, show_config=True):
    """One training run of cfg (model, data, loop, final eval) -> (final val metrics {split: {metric: value}}, the
    trained MaskHead). Call inside an initialised process group when world > 1 (main does)."""
    ddp, master = world > 1, rank == 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    resolved = dataclasses.asdict(cfg)
    if master:
        if show_config:
            print(yaml.safe_dump(resolved, sort_keys=False), end="")
        with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(resolved, f, sort_keys=False)

    qwen, tokenizer = build_qwen(cfg, device)
    train_sets = [build_data(cfg, tokenizer, spec, train=True) for spec in cfg.train_data]
    train_set = train_sets[0] if len(train_sets) == 1 else torch.utils.data.ConcatDataset(train_sets)
    loader = data.build_loader(train_set, cfg.batch_size, num_workers=cfg.num_workers, shuffle=True, seed=cfg.seed,
                               drop_last=True)
    val_loaders = build_val_loaders(cfg, tokenizer, cfg.val_data)
    steps_per_epoch = len(loader) // cfg.grad_accum
    if steps_per_epoch == 0 and not cfg.max_steps:
        raise SystemExit(f"{len(train_set)} training images make no full batch of {cfg.batch_size} x {cfg.grad_accum} "
                         f"on {world} process(es): lower batch_size or grad_accum")
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))

    torch.manual_seed(cfg.seed)  # the same head init on every rank
    head, head_kwargs = build_head(cfg, qwen)
    head.to(device)
    grounder = model.Grounder(qwen, head)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    n_train, n_frozen = sum(p.numel() for p in head.parameters()), sum(p.numel() for p in qwen.parameters())
    print0(f"trainable {n_train / 1e6:.2f}M (mask head) | frozen {n_frozen / 1e6:.1f}M (Qwen2.5-VL) | "
           f"{len(train_set)} training images, {steps_per_epoch} steps/epoch, {total} steps on {world} process(es)")

    step, ckpt_path = 0, os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["head_kwargs"] != head_kwargs:
            raise SystemExit(f"{ckpt_path}: head {ckpt['head_kwargs']} does not match this config's {head_kwargs}")
        model.load_head(head, ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"][rank % len(ckpt["rng"])])
        print0(f"resumed from {ckpt_path} at step {step} of {total}")
    if ddp:  # only the head is wrapped: the frozen VLM has no gradients to synchronise
        grounder.head = DDP(head, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = autocast_for(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=(device.type == "cuda" and cfg.dtype == "float16"))
    writer = None
    if master:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(cfg.out_dir, "tb"))

    def checkpoint():
        rng = [torch.get_rng_state() for _ in range(world)]
        if ddp:
            dist.all_gather_object(rng, torch.get_rng_state())
        if master:
            save_checkpoint(ckpt_path, dict(head=head.state_dict(), head_kwargs=head_kwargs, step=step, rng=rng,
                                            optimizer=optimizer.state_dict(), config=resolved))

    batches = micro_batches(loader, step * cfg.grad_accum)  # resumes mid-epoch in the same seeded order
    bar = tqdm(total=total, initial=step, disable=not master, dynamic_ncols=True, file=sys.stdout, mininterval=2)
    t0, seen, skipped = time.time(), 0, 0
    recent = []  # (step, sample ids, loss) since the last finiteness check
    terms = torch.zeros(4, device=device)  # loss, bce, dice, micro-batches: summed since the last log line
    while step < total:
        lr = lr_at(step, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cfg.eval_every and step and step % cfg.eval_every == 0 and val_loaders:
            metrics = evaluate_all(grounder, val_loaders, device, autocast, cfg.eval_batches)
            for name, m in metrics.items():
                print0(f"step {step} {name}: " + " ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "n"))
                for k, v in m.items():
                    if master:
                        writer.add_scalar(f"eval/{name}/{k}", v, step)
        head.train()
        for k in range(cfg.grad_accum):
            batch = next(batches)
            skipped += batch.get("num_skipped", 0)
            sync = contextlib.nullcontext() if not ddp or k == cfg.grad_accum - 1 else grounder.head.no_sync()
            if "input_ids" not in batch:  # every sample of this micro-batch was bad (skip_bad): nothing to learn
                if ddp:
                    with sync:
                        idle_backward(grounder, device)
                continue
            seen += len(batch["input_ids"])
            with sync:
                with autocast:
                    logits, masks = grounder.supervised(batch, device)
                    loss, parts = grounder.loss(logits, masks)
                recent.append((step, batch["ids"], loss.detach()))
                scaler.scale(loss / cfg.grad_accum).backward()
            one = torch.ones((), device=device)  # counts the micro-batch, for the average
            terms += torch.stack([loss.detach(), parts["bce"].detach(), parts["dice"].detach(), one])
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or step == total:
            check_finite(recent, ckpt_path, device)  # before any checkpoint: a non-finite step is never saved
            recent = []
        if step % cfg.log_every == 0 or step == total:
            if ddp:
                dist.all_reduce(terms)
            loss_v, bce_v, dice_v = (terms[:3] / terms[3].clamp(min=1)).tolist()  # one host sync per log line
            terms.zero_()
            rate = seen * world / (time.time() - t0)
            bar.set_postfix(loss=f"{loss_v:.3f}", lr=f"{lr:.1e}", samples_s=f"{rate:.1f}")
            if master:
                scalars = dict(loss=loss_v, bce=bce_v, dice=dice_v, lr=lr, grad_norm=float(grad_norm), samples_per_s=rate)
                for name, v in scalars.items():
                    writer.add_scalar(f"train/{name}", v, step)
                with open(os.path.join(cfg.out_dir, "log.jsonl"), "a") as f:  # the same numbers as plain text
                    f.write(json.dumps(dict(step=step, **scalars)) + "\n")
            t0, seen = time.time(), 0
        if master and cfg.vis_every and step % cfg.vis_every == 0 and "input_ids" in batch:
            writer.add_image("train/pred_vs_true", evaluation.overlay_grid(batch, logits), step, dataformats="HWC")
        if step % cfg.ckpt_every == 0 or step == total:
            checkpoint()
    bar.close()

    metrics = evaluate_all(grounder, val_loaders, device, autocast)
    if master:
        if skipped:
            print0(f"skipped {skipped} bad samples during training (skip_bad=true)")
        for name, m in metrics.items():
            for k, v in m.items():
                writer.add_scalar(f"eval/{name}/{k}", v, step)
        evaluation.print_table(metrics)
        with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        writer.close()
        for name, (val_loader, _) in list(val_loaders.items())[:1] if cfg.vis_samples else []:
            folder = os.path.join(cfg.out_dir, "vis", name)
            evaluation.write_overlays(grounder, val_loader.dataset, cfg.vis_samples, folder, autocast)
            print0(f"overlays: {folder}")
        print0(f"checkpoint: {ckpt_path}")
    return metrics, head


def init_distributed():
    """The torchrun environment -> (rank, world, device): the process group initialised when WORLD_SIZE > 1 (NCCL on
    CUDA, gloo on the CPU) and this rank's GPU made current, which NCCL collectives rely on. Used by eval.py too."""
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world, device


def main(cfg):
    rank, world, device = init_distributed()
    ddp = world > 1
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.synthetic:
        if rank == 0:
            synthetic.make_synthetic(**cfg.synthetic)
        if ddp:
            dist.barrier()
    try:
        metrics, _ = train(cfg, device, rank, world)
        if cfg.baselines:  # what the head would score without language, and a random object of the image
            ablation = dataclasses.replace(cfg, constant_phrase=cfg.baseline_phrase, baselines=False, resume=False,
                                           vis_samples=0, out_dir=os.path.join(cfg.out_dir, "constant_phrase"))
            print0(f"\nbaseline: the same head trained with every expression replaced by {cfg.baseline_phrase!r} "
                   f"(out_dir={ablation.out_dir}, otherwise the config above)")
            constant, _ = train(ablation, device, rank, world, show_config=False)
            if rank == 0:
                table = {}
                for spec in cfg.val_data:
                    name = data.spec_name(spec)
                    table[f"{name} (ours)"] = metrics[name]
                    table[f"{name} (constant phrase)"] = constant[name]
                    if spec["kind"] == "refer":
                        table[f"{name} (random object)"] = evaluation.random_object_metrics(spec, cfg.protocol,
                                                                                             cfg.seed)
                print0("\ngrounding vs the two baselines:")
                evaluation.print_table(table)
                with open(os.path.join(cfg.out_dir, "baselines.json"), "w") as f:
                    json.dump(table, f, indent=1)
    finally:
        if ddp:
            dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default=None, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. batch_size=8 resume=true")
    args = parser.parse_args()
    main(load_config(args.cfg, args.overrides))
