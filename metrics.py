"""The numbers eval.py reports, computed from masks and pixel counts (no model here): per-mask intersection and union,
RefCOCO's cIoU / mIoU / P@t, gRefCOCO's N-acc / T-acc, PNG's average recall, ReasonSeg's gIoU / cIoU; the per-phrase
rows of an eval summarised into a split's metrics (summarize), the fixed-width table (print_table), and the
baselines beside our rows: a random annotated object of each image (random_object_metrics) and the baselines table.
DESIGN's contract names `eval.mask_metrics`: eval.py re-exports it from here."""
import json
import os

import numpy as np

import data
import selector as selection

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
ROW = dict(final="{split}", coarse="{split} (U-Net only)")  # the table row of each kind of mask (eval.predict_kinds)


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


def reasonseg_stats(pred, target, ignore):
    """ReasonSeg, one image: bool (H, W) masks -> (intersection, union) with the ignore pixels left out of both."""
    keep = ~np.asarray(ignore, bool)
    return iou_stats(np.asarray(pred, bool) & keep, np.asarray(target, bool) & keep)


def reasonseg_metrics(stats):
    """Per-image (intersection, union) -> LISA's gIoU = 100*mean(I/U) (an empty target predicted empty counts 1) and
    cIoU = 100*sum(I)/sum(U)."""
    inter, union = [s[0] for s in stats], [s[1] for s in stats]
    return dict(gIoU=float(100 * _ious(inter, union).mean()) if stats else 0.0,
                cIoU=float(100 * np.sum(inter, dtype=np.float64) / max(np.sum(union, dtype=np.float64), 1)),
                n=len(stats))


def summarize(rows, kind="refer", spans=()):
    """Per-phrase (I, U, flags, predicted pixels) -> metrics. Phrases without a mask (PNG) are not scored.
    spans: per-sequence (tp, predicted, gold) span counts of a phrase selector -> span_P, span_R, span_F1 too."""
    rows = [r for r in rows if r[2]["supervised"]]
    inter, union = [r[0] for r in rows], [r[1] for r in rows]
    out = _metrics(inter, union)
    if len(spans):
        out.update(selection.span_scores(*np.sum(spans, 0).tolist()))
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
            "AR_singular", "AR_plural", "span_P", "span_R", "span_F1", "n"]
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


def baselines_table(specs, protocol, seed, ours, constant=None, unet=None):
    """Our metrics beside the constant-phrase head's (when trained), the U-Net trained alone (unet: with a refiner)
    and a random object's, per split; printed and
    returned as {"<split> (ours)": metrics, ...}."""
    table = {}
    for spec in specs:
        name = data.spec_name(spec)
        for kind, tag in (("final", ""), ("coarse", ", U-Net only")):  # a refiner's run: its U-Net's own masks too
            if ROW[kind].format(split=name) in ours:
                table[f"{name} (ours{tag})"] = ours[ROW[kind].format(split=name)]
        if unet is not None:  # a refiner's run: the same U-Net trained alone for the same epochs
            table[f"{name} (U-Net alone)"] = unet[ROW["final"].format(split=name)]
        if constant is not None:
            table[f"{name} (constant phrase)"] = next(constant[ROW[k].format(split=name)] for k in ROW
                                                      if ROW[k].format(split=name) in constant)
        if spec["kind"] == "refer":
            table[f"{name} (random object)"] = random_object_metrics(spec, protocol, seed)
    print_table(table)
    return table
