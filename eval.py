"""Score a trained mask head: RefCOCO/+/g (cIoU, mIoU, P@t), gRefCOCO (+ no-target accuracy), PNG (average recall).

    python eval.py --ckpt out/demo/ckpt.pt                              # the splits in the run's config
    python eval.py --ckpt out/refcoco/ckpt.pt --split refcoco_testA --protocol flmm --out metrics.json --vis 8
    python eval.py --ckpt out/refcoco/ckpt.pt --image photo.jpg --text "the dog on the left"
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
from PIL import Image, ImageDraw, ImageOps

import data
import model
import qwen_inputs

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def iou_stats(pred, gt):
    """bool masks (H, W) -> (intersection, union) pixel counts."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    return int((pred & gt).sum()), int((pred | gt).sum())


def _ious(inter, union):
    """Per-phrase IoU from pixel counts; an empty prediction of an empty target is a perfect answer (1)."""
    inter, union = np.asarray(inter, np.float64), np.asarray(union, np.float64)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _metrics(inter, union):
    iou = _ious(inter, union)
    total_inter, total_union = np.sum(inter, dtype=np.float64), np.sum(union, dtype=np.float64)
    out = {"cIoU": 100 * total_inter / max(total_union, 1), "mIoU": 100 * iou.mean() if len(iou) else 0.0}
    out.update({f"P@{t}": 100 * float((iou >= t).mean()) if len(iou) else 0.0 for t in THRESHOLDS})
    return {k: float(v) for k, v in out.items()} | {"n": len(iou)}


def mask_metrics(preds, gts):
    """Lists of bool masks -> cIoU = 100*sum(I)/sum(U), mIoU = 100*mean(I/U) (empty/empty = 1), P@0.5..0.9."""
    stats = [iou_stats(p, g) for p, g in zip(preds, gts, strict=True)]
    return _metrics([s[0] for s in stats], [s[1] for s in stats])


def average_recall(ious):
    """PNG's metric: area under recall(IoU >= t) for t on [0, 1) in steps of 1e-5, as the PNG benchmark sums it."""
    ious = np.sort(np.asarray(ious, np.float64))
    if not len(ious):
        return 0.0
    t = np.arange(0, 1, 0.00001)
    recall = 1 - np.searchsorted(ious, t, side="left") / len(ious)
    return float(100 * np.sum(np.diff(t) * recall[:-1]))


@torch.no_grad()
def predict(grounder, batch, sizes):
    """Batch -> one bool mask per phrase (batch order, then phrase order), upsampled to its image's original size;
    sizes: one (H, W) per sample."""
    logits = grounder(batch)
    per_phrase = [hw for hw, k in zip(sizes, qwen_inputs.phrase_counts(batch), strict=True) for _ in range(k)]
    return [F.interpolate(x[None, None].float(), size=hw, mode="bilinear", align_corners=False)[0, 0] > 0
            for x, hw in zip(logits, per_phrase, strict=True)]


def gt_sizes(batch):
    return [tuple(m.shape[-2:]) for m in batch["gt_masks"]]


@torch.no_grad()
def evaluate(grounder, loader, device, kind="refer", autocast=contextlib.nullcontext(), max_batches=0):
    """Score the loader's dataset (every rank its shard, results gathered) -> the metrics of its kind:
    refer: cIoU, mIoU, P@t; grefcoco: also N-acc / T-acc; png: average recall overall and per group."""
    was_training = grounder.training
    grounder.eval()
    rows = []  # per phrase: (intersection, union, flags, predicted pixels)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        if "input_ids" not in batch:  # every sample of the batch was unreadable (skip_bad)
            continue
        with autocast:
            preds = predict(grounder, batch, gt_sizes(batch))
        gts = [g.to(p.device, non_blocking=True) for g, p in zip((g for m in batch["gt_masks"] for g in m), preds)]
        # I, U and predicted pixels on the device, one host transfer per batch
        stats = torch.stack([torch.stack([(p & g).sum(), (p | g).sum(), p.sum()]) for p, g in zip(preds, gts,
                                                                                              strict=True)]).tolist()
        flags = {key: [f for fl in batch[key] for f in fl] for key in ("no_target", "isthing", "plural", "supervised")}
        for j, (inter, union, area) in enumerate(stats):
            rows.append((inter, union, {k: bool(v[j]) for k, v in flags.items()}, area))
    if dist.is_initialized():  # the per-phrase I, U of every rank: sums (cIoU) and per-phrase IoUs (mIoU, P@t, AR)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    grounder.train(was_training)
    return summarize(rows, kind)


def summarize(rows, kind="refer"):
    """Per-phrase (I, U, flags, predicted pixels) -> metrics. Phrases without a mask (PNG) are not scored."""
    rows = [r for r in rows if r[2]["supervised"]]
    inter, union = [r[0] for r in rows], [r[1] for r in rows]
    out = _metrics(inter, union)
    if kind == "grefcoco":  # N-acc: empty prediction for a no-target expression; T-acc: non-empty for the others
        nt = np.array([r[2]["no_target"] for r in rows], bool)
        empty = np.array([r[3] == 0 for r in rows], bool)
        out["N-acc"] = float(100 * empty[nt].mean()) if nt.any() else 0.0
        out["T-acc"] = float(100 * (~empty[~nt]).mean()) if (~nt).any() else 0.0
    if kind == "png":  # average recall overall, things / stuff, singular / plural
        iou = _ious(inter, union)
        things = np.array([r[2]["isthing"] for r in rows], bool)
        plural = np.array([r[2]["plural"] for r in rows], bool)
        groups = {"AR": np.ones(len(rows), bool), "AR_things": things, "AR_stuff": ~things,
                  "AR_singular": ~plural, "AR_plural": plural}
        out.update({k: average_recall(iou[sel]) for k, sel in groups.items()})
    return out


def print_table(results):
    """{name: metrics} -> a fixed-width table on stdout, the columns any row has."""
    keys = ["cIoU", "mIoU", *[f"P@{t}" for t in THRESHOLDS], "N-acc", "T-acc", "AR", "AR_things", "AR_stuff",
            "AR_singular", "AR_plural", "n"]
    keys = [k for k in keys if any(k in r for r in results.values())]
    width = max([len(n) for n in results] + [5])
    print(f"{'split':<{width}} " + " ".join(f"{k:>7}" for k in keys), flush=True)
    for name, r in results.items():
        print(f"{name:<{width}} " + " ".join(f"{r[k]:>7d}" if k == "n" else f"{r[k]:>7.2f}" if k in r else f"{'':>7}"
                                              for k in keys), flush=True)


def random_object_metrics(spec, protocol="standard", seed=0):
    """Baseline: for every scored expression, the mask of a uniformly drawn annotated object of its image."""
    records = data.load_refer(spec["data_root"], spec["dataset"], spec["split_by"], spec["split"])
    with open(os.path.join(spec["data_root"], spec["dataset"], "instances.json")) as f:
        anns = json.load(f)["annotations"]
    by_image = {}
    for ann in anns:
        by_image.setdefault(ann["image_id"], []).append(ann)
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for r in records:
        gt = data.decode_mask(r["segmentation"], r["height"], r["width"])
        for _ in (r["sentences"] if protocol == "standard" else r["sentences"][:1]):
            pick = by_image[r["image_id"]][rng.integers(len(by_image[r["image_id"]]))]
            preds.append(data.decode_mask(pick["segmentation"], r["height"], r["width"]))
            gts.append(gt)
    return mask_metrics(preds, gts)


def _edge(mask):
    """The pixels of a bool mask that touch its outside (4-neighbourhood)."""
    return mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))


def overlay(image, pred, gt=None, text=""):
    """uint8 (H, W, 3) image + bool masks -> uint8 picture: prediction tinted red and outlined in black (visible on
    a red object too), truth outlined in green, text on top."""
    out = image.astype(np.float32)
    out[pred] = 0.5 * out[pred] + 0.5 * np.array([255, 0, 0])
    out[_edge(pred)] = [0, 0, 0]
    if gt is not None:
        out[_edge(gt)] = [0, 255, 0]
    picture = Image.fromarray(out.astype(np.uint8))
    if text:
        draw = ImageDraw.Draw(picture)
        draw.rectangle([0, 0, picture.width, 14], fill=(0, 0, 0))
        draw.text((2, 1), text[:120], fill=(255, 255, 255))
    return np.asarray(picture)


def overlay_grid(batch, logits):
    """The first sample of a batch, every phrase side by side at the resized resolution (for tensorboard)."""
    (image,) = qwen_inputs.unpatchify(batch["pixel_values"][: int(batch["image_grid_thw"][0].prod())],
                                      batch["image_grid_thw"][:1])
    tiles = [overlay(image, (x.detach().float() > 0).cpu().numpy(), (m > 0.5).cpu().numpy(), phrase)
             for x, m, phrase in zip(logits, batch["masks"][0], batch["phrases"][0])]
    return np.concatenate(tiles, axis=1)


def load_run(ckpt_path, device):
    """Checkpoint -> (grounder, tokenizer, Config): the VLM named in the saved config, the head from the checkpoint."""
    import train  # the config and the frozen-model builder live with the trainer
    if not os.path.isfile(ckpt_path):
        raise SystemExit(f"{ckpt_path}: no such checkpoint")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = train.config_from_dict(ckpt["config"], ckpt_path)
    qwen, tokenizer = train.build_qwen(cfg, device)
    head = model.load_head(model.MaskHead(**ckpt["head_kwargs"]), ckpt["head"]).to(device)
    return model.Grounder(qwen, head).eval(), tokenizer, cfg


def predict_image(grounder, tokenizer, cfg, path, text, out_path):
    """One picture (EXIF orientation applied, as a viewer shows it) and one expression -> overlay PNG."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    pixel_values, grid = qwen_inputs.patchify(image, cfg.min_pixels, cfg.max_pixels)
    sample = dict(qwen_inputs.build_inputs(tokenizer, grid, [text]), pixel_values=pixel_values, image_grid_thw=grid)
    (mask,) = predict(grounder, qwen_inputs.collate([sample]), [(image.height, image.width)])
    Image.fromarray(overlay(np.asarray(image), mask.cpu().numpy(), None, text)).save(out_path)
    return mask


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--split", nargs="*", help="names of the config's test_data splits to score (default all)")
    parser.add_argument("--protocol", choices=["standard", "flmm"], help="default: the run's config")
    parser.add_argument("--out", help="write the metrics as JSON here")
    parser.add_argument("--vis", type=int, default=0, help="write this many overlay PNGs per split")
    parser.add_argument("--batch_size", type=int, default=0, help="default: the run's batch_size")
    parser.add_argument("--baselines", action="store_true",
                        help="also score a random object of each image, and the constant-phrase ablation if trained")
    parser.add_argument("--image", help="predict one picture (with --text) and write an overlay PNG")
    parser.add_argument("--text")
    args = parser.parse_args()
    import train  # the config, the frozen-model builder and the torchrun setup live with the trainer
    rank, world, device = train.init_distributed()
    grounder, tokenizer, cfg = load_run(args.ckpt, device)
    out_dir = os.path.dirname(os.path.abspath(args.ckpt))
    if args.image:
        if not args.text:
            raise SystemExit("--image needs --text: the expression to ground")
        out_path = os.path.join(out_dir, os.path.splitext(os.path.basename(args.image))[0] + "_pred.png")
        mask = predict_image(grounder, tokenizer, cfg, args.image, args.text, out_path)
        print(f"{args.image}: {int(mask.sum())} pixels for {args.text!r} -> {out_path}")
        return
    cfg.protocol = args.protocol or cfg.protocol
    cfg.batch_size = args.batch_size or cfg.batch_size
    autocast = train.autocast_for(cfg, device)
    specs = [s for s in cfg.test_data or cfg.val_data if not args.split or data.spec_name(s) in args.split]
    if not specs:
        known = [data.spec_name(s) for s in cfg.test_data or cfg.val_data]
        raise SystemExit(f"--split {args.split}: none of the run's splits {known}")
    results = {}
    constant = os.path.join(out_dir, "constant_phrase", "ckpt.pt")  # written by train.py baselines=true
    ablation = None
    if args.baselines and os.path.isfile(constant):  # its own config: every expression becomes its constant phrase
        ablation, ablation_tokenizer, ablation_cfg = load_run(constant, device)
        ablation_cfg.protocol, ablation_cfg.batch_size = cfg.protocol, cfg.batch_size
        ablation_loaders = train.build_val_loaders(ablation_cfg, ablation_tokenizer, specs)
    for name, (loader, spec) in train.build_val_loaders(cfg, tokenizer, specs).items():
        results[name] = evaluate(grounder, loader, device, spec["kind"], autocast)
        if ablation is not None:
            results[f"{name} (constant phrase)"] = evaluate(ablation, ablation_loaders[name][0], device, spec["kind"],
                                                            autocast)
        if args.baselines and spec["kind"] == "refer" and rank == 0:
            results[f"{name} (random object)"] = random_object_metrics(spec, cfg.protocol, cfg.seed)
        if args.vis and rank == 0:
            folder = os.path.join(out_dir, "vis", name)
            write_overlays(grounder, loader.dataset, args.vis, folder, autocast)
            print(f"overlays: {folder}")
    if rank == 0:
        print(f"{args.ckpt} | protocol {cfg.protocol}")
        print_table(results)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(ckpt=args.ckpt, protocol=cfg.protocol, results=results), f, indent=1)
    if world > 1:
        dist.destroy_process_group()


def write_overlays(grounder, dataset, n, folder, autocast=contextlib.nullcontext()):
    """The first n samples of a dataset: one PNG per phrase with the expression, prediction and truth."""
    os.makedirs(folder, exist_ok=True)
    for i in range(min(n, len(dataset))):
        sample = dataset[i]
        if sample is None:  # unreadable (skip_bad)
            continue
        batch = qwen_inputs.collate([sample])
        with autocast:
            preds = predict(grounder, batch, gt_sizes(batch))
        with Image.open(os.path.join(dataset.image_dir, sample["file_name"])) as f:
            image = np.asarray(f.convert("RGB"))
        for k, (p, g, phrase) in enumerate(zip(preds, sample["gt_masks"], sample["phrases"])):
            picture = overlay(image, p.cpu().numpy(), g.numpy(), phrase)
            Image.fromarray(picture).save(os.path.join(folder, f"{i:04d}_{k}.png"))


if __name__ == "__main__":
    main()
