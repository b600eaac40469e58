"""Score a trained mask head: RefCOCO/+/g (cIoU, mIoU, P@t), gRefCOCO (+ no-target accuracy), PNG (average recall).

    python eval.py --ckpt out/demo/ckpt.pt                              # the splits in the run's config
    python eval.py --ckpt out/refcoco/ckpt.pt --split refcoco_testA --protocol flmm --out metrics.json --vis 8
    python eval.py --ckpt out/refcoco/ckpt.pt --image photo.jpg --text "the dog on the left"
    python eval.py --ckpt out/refcoco/ckpt.pt --image photo.jpg --text "the dog" --maps maps.png  # what it attends to
    python eval.py --ckpt exported_dir_or_hub_id                        # export.py's output works wherever ckpt.pt does
    python eval.py --ckpt out/demo/ckpt.pt --cache --split synthetic_val     # from the run's cache_dir, no VLM
    torchrun --nproc_per_node=8 eval.py --ckpt out/refcoco/ckpt.pt      # per-phrase results gathered over ranks

Predictions are upsampled from the resized image to the original size; a pixel is in the mask when sigmoid > 0.5.
"""
import argparse
import contextlib
import json
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import batching
import build
import cache
import cached
import data
import draw
import head as heads
import metrics as scoring
import model
import qwen_inputs
import selector as selection

mask_metrics = scoring.mask_metrics  # DESIGN's contract names eval.mask_metrics(preds, gts); defined in metrics.py


@torch.no_grad()
def predict(qwen, grounder, batch, sizes, coarse=False, spans=None, logits=False):
    """Batch (on the device) -> one bool mask per phrase (batch order, then phrase order), upsampled to its image's
    original size; sizes: one (H, W) per sample. The refined masks when the grounder has a refiner, unless coarse.
    spans: a list that gets, with a phrase selector, each sequence's exact-match span counts (tp, predicted, gold).
    logits: the float32 logits at that size (mask = logits > 0) instead."""
    kind = "coarse" if coarse else "final"
    return predict_kinds(qwen, grounder, batch, sizes, (kind,), spans, logits)[kind]


@torch.no_grad()
def predict_kinds(qwen, grounder, batch, sizes, kinds, spans=None, logits=False):
    """predict for several kinds of mask from ONE frozen forward and grounder call: {kind: masks}, kind "final"
    (refined with a refiner, else the U-Net's) or "coarse" (the U-Net's). logits: the float32 logits the masks
    threshold at 0, at the same size, instead of the masks."""
    frozen = build.extract(qwen, grounder, batch)
    out = grounder(frozen)
    if spans is not None and "select" in out:  # gold: the supervised phrases (heads.answer_tags)
        spans += [selection.span_counts(selection.decode(x), selection.tag_spans(t))
                  for x, t in zip(out["select"], heads.answer_tags(batch), strict=True)]
    outputs = dict(final=out.get("refined", out["coarse"]), coarse=out["coarse"])
    up = {kind: [F.interpolate(x[None, None].float(), size=sizes[i], mode="bilinear", align_corners=False)[0, 0]
                 for x, i in zip(outputs[kind], frozen["phrase_image"], strict=True)] for kind in kinds}
    return up if logits else {kind: [x > 0 for x in xs] for kind, xs in up.items()}


def gt_sizes(batch):
    return [tuple(m.shape[-2:]) for m in batch["gt_masks"]]



@torch.no_grad()
def evaluate(qwen, grounder, loader, device, kind="refer", autocast=contextlib.nullcontext(), max_batches=0,
             kinds=("final",)):
    """Score the loader's dataset (every rank its shard, results gathered) -> {mask kind: metrics}, one entry per
    kind in `kinds` (predict_kinds: "final", "coarse"), all from the same forwards. The metrics of the dataset's
    `kind`: refer: cIoU, mIoU, P@t; grefcoco: also N-acc / T-acc; png: average recall overall and per group."""
    was_training = grounder.training
    grounder.eval()
    rows, spans = {k: [] for k in kinds}, []  # per phrase: (I, U, flags, predicted pixels); per sequence: spans
    batches = min(max_batches or len(loader), len(loader))
    lockstep = model.sharded(qwen)
    if lockstep:  # a sharded VLM needs every rank in every forward: all run as many as the longest shard
        count = torch.tensor(batches, device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        batches = int(count)
    loader_iter, last = iter(loader), None
    for _ in range(batches):
        batch = next(loader_iter, None)
        if batch is None or "phrases" not in batch:  # a shorter shard, or every sample unreadable (skip_bad)
            if lockstep and last is not None:  # join the other ranks' forward, result discarded
                with autocast:
                    predict_kinds(qwen, grounder, last, gt_sizes(last), kinds)
            continue
        batch = last = model.to_device(batch, device, model.DEVICE_KEYS + ("gt_masks",))
        with autocast:
            preds = predict_kinds(qwen, grounder, batch, gt_sizes(batch), kinds, spans)
        gts = [g for m in batch["gt_masks"] for g in m]
        flags = {key: [f for fl in batch[key] for f in fl] for key in ("no_target", "isthing", "plural", "supervised")}
        for k in kinds:  # I, U and predicted pixels on the device, one host transfer per batch and kind
            stats = torch.stack([torch.stack([(p & g).sum(), (p | g).sum(), p.sum()])
                                 for p, g in zip(preds[k], gts, strict=True)]).tolist()
            for j, (inter, union, area) in enumerate(stats):
                rows[k].append((inter, union, {f: bool(v[j]) for f, v in flags.items()}, area))
    if dist.is_initialized():  # the per-phrase I, U of every rank: sums (cIoU) and per-phrase IoUs (mIoU, P@t, AR)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        rows = {k: [r for part in gathered for r in part[k]] for k in kinds}
        dist.all_gather_object(gathered, spans)
        spans = [c for part in gathered for c in part]
    grounder.train(was_training)
    return {k: scoring.summarize(rows[k], kind, spans) for k in kinds}


def evaluate_all(qwen, grounder, loaders, device, autocast=contextlib.nullcontext(), max_batches=0, kinds=("final",)):
    """{split: (loader, spec)} -> {table row: metrics}: per split one row per kind of mask, named by metrics.ROW
    ("<split>" for the final masks, "<split> (U-Net only)" for the coarse ones)."""
    return {scoring.ROW[k].format(split=name): m for name, (loader, spec) in loaders.items()
            for k, m in evaluate(qwen, grounder, loader, device, spec["kind"], autocast, max_batches, kinds).items()}


def mask_kinds(grounder, coarse=False):
    """What a run reports: with a refiner its refined masks and the U-Net's (F-LMM's ablation in one table), or only
    the U-Net's (coarse); without one, the U-Net's masks are the final ones."""
    if coarse:
        return ("coarse",)
    return ("final", "coarse") if getattr(grounder, "module", grounder).refiner is not None else ("final",)


# ---------------------------------------------------------------------------------------------- pictures

def write_overlays(qwen, grounder, loader, n, folder, device, autocast=contextlib.nullcontext(), coarse=False):
    """One PNG per phrase (expression, prediction, truth) for the first n distinct images of a loader's dataset
    (coarse: the U-Net's masks). Written by rank 0; with a sharded VLM every rank must call it (they all run the
    same forwards)."""
    dataset, save = loader.dataset, int(os.environ.get("RANK", 0)) == 0
    os.makedirs(folder, exist_ok=True)
    seen = set()
    for i in range(len(dataset)):
        if len(seen) == n:
            break
        if dataset.items[i]["image_id"] in seen:  # the standard protocol has one item per sentence: other scenes
            continue
        batch = loader.collate_fn([dataset[i]])  # collate_skip, or cached.collate; a packed item: its rows
        if "phrases" not in batch:  # unreadable (skip_bad)
            continue
        seen.add(batch["image_id"][0])
        batch = model.to_device(batch, device)
        with autocast:
            preds = predict(qwen, grounder, batch, gt_sizes(batch), coarse)
        if not save:
            continue
        with Image.open(os.path.join(dataset.image_dir, batch["file_name"][0])) as f:
            image = np.asarray(f.convert("RGB"))
        truth, phrases = [g for m in batch["gt_masks"] for g in m], [p for ps in batch["phrases"] for p in ps]
        for k, (p, g, phrase) in enumerate(zip(preds, truth, phrases, strict=True)):
            picture = draw.overlay(image, p.cpu().numpy(), g.cpu().numpy(), phrase)
            Image.fromarray(picture).save(os.path.join(folder, f"{i:04d}_{k}.png"))


def report(qwen, grounder, loaders, device, autocast, out_dir, vis=0, writer=None, step=0, coarse=False):
    """The end of a run (train.py) or of eval.py: score every split, print the table, write metrics.json and
    overlays of `vis` scenes of the first split (rank 0), return {split: metrics}. With a refiner also the U-Net's
    own masks, as "<split> (U-Net only)": F-LMM's ablation in one table."""
    metrics = evaluate_all(qwen, grounder, loaders, device, autocast, kinds=mask_kinds(grounder, coarse))
    if int(os.environ.get("RANK", 0)) != 0:
        if model.sharded(qwen):  # rank 0 writes the overlays, but every rank must join their forwards
            for name, (loader, _) in list(loaders.items())[:1] if vis else []:
                write_overlays(qwen, grounder, loader, vis, os.path.join(out_dir, "vis", name), device, autocast)
        return metrics
    for name, m in metrics.items():
        for k, v in m.items():
            if writer is not None:
                writer.add_scalar(f"eval/{name}/{k}", v, step)
    scoring.print_table(metrics)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    for name, (loader, _) in list(loaders.items())[:1] if vis else []:
        folder = os.path.join(out_dir, "vis", name)
        write_overlays(qwen, grounder, loader, vis, folder, device, autocast)
        print(f"overlays: {folder}", flush=True)
    return metrics


# ------------------------------------------------------------------------------------------- command line

def predict_image(qwen, grounder, tokenizer, cfg, image, text, device, out_path):
    """One picture (PIL, EXIF orientation applied) and one expression -> bool mask; writes an overlay PNG."""
    samples = batching.picture_samples(tokenizer, build.image_settings(cfg, tokenizer), image, [text],
                                       sam_settings=build.sam_settings(grounder))
    batch = model.to_device(qwen_inputs.collate(samples), device)
    (mask,) = predict(qwen, grounder, batch, [(image.height, image.width)])
    Image.fromarray(draw.overlay(np.asarray(image), mask.cpu().numpy(), None, text)).save(out_path)
    return mask


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a ckpt.pt, an export.py directory or a Hub id holding one")
    parser.add_argument("--model", help="a local copy of the checkpoint's base VLM to load instead (another is refused)")
    parser.add_argument("--split", nargs="*", help="names of the run's test_data splits to score (default all): "
                        "<dataset>_<split> as the tables print them, e.g. refcoco_testA, refcocog_umd_val")
    parser.add_argument("--protocol", choices=["standard", "flmm"], help="default: the run's config")
    parser.add_argument("--out", help="write the metrics as JSON here (with --image: the overlay PNG)")
    parser.add_argument("--vis", type=int, default=0, help="write overlay PNGs of this many scenes per split")
    parser.add_argument("--batch_size", type=int, default=0, help="default: the run's batch_size")
    parser.add_argument("--coarse", action="store_true", help="score the U-Net's masks, not the refiner's")
    parser.add_argument("--baselines", action="store_true",
                        help="also score a random object of each image, and the constant-phrase ablation if trained")
    parser.add_argument("--image", help="predict one picture (with --text) and write an overlay PNG")
    parser.add_argument("--text", help="the expression to ground in --image")
    parser.add_argument("--maps", help="with --image/--text: also draw the attention maps the head reads to this PNG")
    parser.add_argument("--cache", action="store_true",
                        help="read the frozen outputs from the run's cache_dir (no VLM; the splits must be in it)")
    args = parser.parse_args()
    # everything that can be checked without the model, before it loads
    ckpt = build.load_checkpoint(args.ckpt)
    out_dir = os.path.dirname(os.path.abspath(args.ckpt)) if os.path.exists(args.ckpt) else os.getcwd()  # (Hub id)
    if args.image is not None:
        if args.text is None or not args.text.strip():
            raise SystemExit(f"--image needs a non-empty --text (the expression to ground), got {args.text!r}")
        if args.split or args.cache or args.vis:
            raise SystemExit("--image grounds one picture: --split, --cache and --vis do not apply to it")
        image = data.open_image(args.image)
        out_path = args.out or os.path.join(
            out_dir, f"{os.path.splitext(os.path.basename(args.image))[0]}_{data.slug(args.text)}.png")
    elif args.text is not None or args.maps is not None:
        raise SystemExit("--text and --maps need --image: the picture to ground the text in")
    if args.coarse and not ckpt["grounder_kwargs"]["refiner"]:
        raise SystemExit(f"--coarse: {args.ckpt} has no refiner, its masks are the U-Net's already; drop --coarse")
    cfg = build.config_from_dict(ckpt["config"], args.ckpt)
    cfg.protocol = args.protocol or cfg.protocol
    cfg.batch_size = args.batch_size or cfg.batch_size
    known = [data.spec_name(s) for s in cfg.test_data or cfg.val_data]
    unknown = [name for name in args.split or [] if name not in known]
    if unknown:
        raise SystemExit(f"--split {unknown}: not among the run's {'test' if cfg.test_data else 'val'}_data splits "
                         f"{known}")
    specs = [s for s in cfg.test_data or cfg.val_data if not args.split or data.spec_name(s) in args.split]
    if args.cache:
        if not cfg.cache_dir:
            raise SystemExit(f"--cache: {args.ckpt} was trained online (no cache_dir in its config)")
        cache.check_cache(cfg, specs)
    if args.image is None:
        build.check_data(cfg, specs)

    rank, world, device = build.init_distributed()
    qwen, grounder, tokenizer, _ = build.load_run(args.ckpt, device, model=args.model, cached=args.cache)
    if args.image is not None:
        mask = predict_image(qwen, grounder, tokenizer, cfg, image, args.text, device, out_path)
        print(f"{args.image}: {int(mask.sum())} pixels for {args.text!r} -> {out_path}")
        if args.maps:
            import ground  # (ground.py builds on this file)
            Image.fromarray(ground.Grounding(qwen, grounder, tokenizer, cfg).maps_picture(image, args.text)).save(
                args.maps)
            print(f"attention maps: {args.maps}")
        return
    autocast = build.autocast_for(cfg, device)
    kinds = ("coarse",) if args.coarse else ("final",)
    loaders = (cached.build_val_loaders(cfg, specs) if args.cache else
               build.build_val_loaders(cfg, tokenizer, specs, build.sam_settings(grounder)))
    results = evaluate_all(qwen, grounder, loaders, device, autocast, kinds=kinds)
    constant_path, constant = os.path.join(out_dir, "constant_phrase", "ckpt.pt"), None  # train.py baselines=true
    if args.baselines and os.path.isfile(constant_path):  # its own config: every expression is its constant phrase
        qwen_c, grounder_c, tokenizer_c, cfg_c = build.load_run(constant_path, device, cached=args.cache)
        cfg_c.protocol, cfg_c.batch_size = cfg.protocol, cfg.batch_size
        loaders_c = (cached.build_val_loaders(cfg_c, specs) if args.cache else
                     build.build_val_loaders(cfg_c, tokenizer_c, specs, build.sam_settings(grounder_c)))
        constant = evaluate_all(qwen_c, grounder_c, loaders_c, device, autocast, kinds=kinds)
    if args.vis and (rank == 0 or model.sharded(qwen)):
        for name, (loader, _) in loaders.items():  # beside the training run's vis/, never over it
            folder = os.path.join(out_dir, "eval_vis", f"{name}_{cfg.protocol}" + ("_coarse" if args.coarse else ""))
            write_overlays(qwen, grounder, loader, args.vis, folder, device, autocast, args.coarse)
            if rank == 0:
                print(f"overlays: {folder}")
    if rank == 0:
        print(f"{args.ckpt} | protocol {cfg.protocol} | {'coarse (U-Net)' if args.coarse else 'final'} masks")
        if args.baselines:
            results = scoring.baselines_table(specs, cfg.protocol, cfg.seed, results, constant)
        else:
            scoring.print_table(results)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(ckpt=args.ckpt, protocol=cfg.protocol, coarse=args.coarse, results=results), f,
                          indent=1)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
