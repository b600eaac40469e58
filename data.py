"""Referring data on disk -> records and masks: RefCOCO/+/g and gRefCOCO (refer layout), Panoptic Narrative Grounding,
ReasonSeg (synthetic.py writes a dataset in the refer layout); the data specs of a config. batching.py turns records
into token sequences and batches.

Loaders return records (no image opened). Refer/gRefCOCO: one per referred object, `ref_id, ann_ids, image_id,
file_name, height, width, segmentations` (target = their union; none for no-target), `sentences, sent_ids,
category_id, no_target`, plus refer's single `ann_id, segmentation`. Masks are bool (H, W) on the stored pixels:
images are never EXIF-rotated, as the annotations were made on the stored pixels."""
import json
import os
import pickle
import warnings

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image, ImageOps


class DataError(ValueError):
    """Bad input data: a missing or corrupt file, an unknown id, an empty expression. The message names the file."""


def _bad(msg, skip_bad, skipped):
    """Strict mode raises; skip mode records the message (the caller drops the sample)."""
    if not skip_bad:
        raise DataError(msg)
    skipped.append(msg)


def _report(where, skipped, start):
    if len(skipped) > start:
        print(f"{where}: skipped {len(skipped) - start} bad entries, first: {skipped[start]}")


# ----------------------------------------------------------------------------------------------- loaders

class _DataOnlyUnpickler(pickle.Unpickler):
    """A refs file is lists, dicts, strings and numbers: any global (a class, a function) means it is not one."""

    def __init__(self, file, path):
        super().__init__(file, encoding="utf-8")  # the refer files were pickled by Python 2: its str -> utf-8
        self.path = path

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{self.path}: refusing to load global {module}.{name}; a refs file holds only "
                                     f"plain data, and a pickle that names globals can run code")


def _load_json(path):
    with open(path) as f:
        return json.load(f)


def _ref_records(refs, refs_path, instances_path, split, skip_bad, skipped):
    """refer/grefer refs of `split` -> records, checked against instances.json."""
    skipped = [] if skipped is None else skipped
    start, instances = len(skipped), _load_json(instances_path)
    images = {im["id"]: im for im in instances["images"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    splits = sorted({ref["split"] for ref in refs})
    if split not in splits:  # a typo (split: trian) would otherwise be an empty dataset
        raise DataError(f"{refs_path}: no split {split!r}; its splits are {splits}")
    records = []
    for ref in refs:
        if ref["split"] != split:  # exact: "testA" is not "test"
            continue
        where = f"{refs_path}: ref_id {ref['ref_id']}"
        ann_ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
        ann_ids = [a for a in ann_ids if a != -1]  # gRefCOCO marks a no-target expression with [-1]
        missing = [a for a in ann_ids if a not in anns]
        if missing or ref["image_id"] not in images:
            what = f"ann_id {missing}" if missing else f"image_id {ref['image_id']}"
            _bad(f"{where}: {what} not in {instances_path}", skip_bad, skipped)
            continue
        sents = [s for s in ref["sentences"] if s["sent"].strip()]
        if len(sents) < len(ref["sentences"]):
            _bad(f"{where}: empty sentence", skip_bad, skipped)
            if not sents:
                continue
        image = images[ref["image_id"]]
        records.append(dict(
            ref_id=ref["ref_id"], ann_ids=ann_ids, image_id=ref["image_id"],
            file_name=image["file_name"],  # the real file; the refs' own file_name is not one
            height=image["height"], width=image["width"], segmentations=[anns[a]["segmentation"] for a in ann_ids],
            sentences=[s["sent"] for s in sents], sent_ids=[s["sent_id"] for s in sents],
            category_id=ref.get("category_id"), no_target=bool(ref.get("no_target", False)) or not ann_ids))
    _report(refs_path, skipped, start)
    return records


_RECORDS = {}  # (the files with their mtime and size, split, skip_bad) -> (records, skip messages)


def _read_once(load, paths, split, skip_bad, skipped):
    """load(skipped) -> records, read once per process for the same unchanged files (a run builds each split's
    dataset several times: extraction, training, the baselines; the demo's instances.json took 0.3 s a read). Each
    call gets its own record dicts; their lists are shared and only read."""
    stamps = [os.stat(p) if os.path.exists(p) else None for p in paths]  # a missing file: load() names it
    key = (tuple((p, s and s.st_mtime_ns, s and s.st_size) for p, s in zip(paths, stamps)), split, skip_bad)
    if key not in _RECORDS:
        messages = []
        _RECORDS[key] = (load(messages), messages)
    records, messages = _RECORDS[key]
    if skipped is not None:
        skipped.extend(messages)
    return [dict(r) for r in records]


def load_refer(data_root, dataset, split_by, split, *, skip_bad=False, skipped=None):
    """RefCOCO/+/g records of one split from `data_root/<dataset>/refs(<split_by>).p` + `instances.json`.

    skip_bad=False raises DataError on an unknown ann_id/image_id or an empty sentence; skip_bad=True leaves the
    ref (or sentence) out and appends the reason to `skipped` (a list) when given."""
    refs_path = os.path.join(data_root, dataset, f"refs({split_by}).p")
    instances_path = os.path.join(data_root, dataset, "instances.json")

    def load(messages):
        with open(refs_path, "rb") as f:
            refs = _DataOnlyUnpickler(f, refs_path).load()
        records = _ref_records(refs, refs_path, instances_path, split, skip_bad, messages)
        for r in records:
            r["ann_id"], r["segmentation"] = r["ann_ids"][0], r["segmentations"][0]
        return records
    return _read_once(load, (refs_path, instances_path), split, skip_bad, skipped)


def load_grefcoco(data_root, split, *, skip_bad=False, skipped=None):
    """gRefCOCO records from `data_root/grefcoco/grefs(unc).json` + `instances.json`: one or many targets (their
    union), or none (`no_target`, empty `segmentations`). Bad entries as in `load_refer`."""
    refs_path = os.path.join(data_root, "grefcoco", "grefs(unc).json")
    instances_path = os.path.join(data_root, "grefcoco", "instances.json")
    return _read_once(lambda messages: _ref_records(_load_json(refs_path), refs_path, instances_path, split, skip_bad,
                                                    messages), (refs_path, instances_path), split, skip_bad, skipped)


def load_png(png_json, panoptic_json, panoptic_dir, *, skip_bad=False, skipped=None):
    """Panoptic Narrative Grounding: one item per narrative of `png_coco_{split}2017.json` (see `refer_items` for the
    item layout), its phrases the segments' utterances in order, each with the `segment_ids` of its mask.

    A segment with no segment_ids, or none in the image's panoptic segments_info, stays in the text with
    supervised=False. A narrative with no supervised phrase is left out (the benchmark does not score it). Plural
    phrases are the union of their segments; `isthing` is the first segment's category's."""
    skipped = [] if skipped is None else skipped
    start, panoptic = len(skipped), _load_json(panoptic_json)
    images = {im["id"]: im for im in panoptic["images"]}
    anns = {a["image_id"]: a for a in panoptic["annotations"]}
    isthing = {c["id"]: bool(c["isthing"]) for c in panoptic["categories"]}
    items = []
    for n, narrative in enumerate(_load_json(png_json)):
        image_id = int(narrative["image_id"])  # a string in the released files
        where = f"{png_json}: narrative {n} (image_id {image_id})"
        if image_id not in images or image_id not in anns:
            _bad(f"{where}: image_id not in {panoptic_json}", skip_bad, skipped)
            continue
        segments = {s["id"]: s for s in anns[image_id]["segments_info"]}
        entries = []
        for seg in narrative["segments"]:
            ids = [int(i) for i in seg["segment_ids"] if int(i) in segments]
            if not seg["utterance"].strip():
                if ids:
                    _bad(f"{where}: empty utterance grounded to segments {ids}", skip_bad, skipped)
                continue
            entries.append(dict(sentences=[seg["utterance"].strip()], ids=[f"{n}/{len(entries)}"], segment_ids=ids,
                                supervised=bool(ids), no_target=False, plural=bool(seg.get("plural", len(ids) > 1)),
                                isthing=bool(ids) and isthing[segments[ids[0]]["category_id"]]))
        if any(e["supervised"] for e in entries):
            image = images[image_id]
            items.append(dict(image_id=image_id, file_name=image["file_name"], height=image["height"],
                              width=image["width"], entries=entries,
                              panoptic_file=os.path.join(panoptic_dir, anns[image_id]["file_name"])))
    _report(png_json, skipped, start)
    return items


def load_reasonseg(folder):
    """ReasonSeg (LISA's release), one split folder: every `<name>.jpg` with its `<name>.json` ({"shapes": [{"label",
    "points": [[x, y], ...]}], "text": [queries], "is_sentence"}) -> records dict(file_name, path, json, height, width,
    texts, is_sentence, shapes), sorted by name. Only image headers are read (the size). A missing JSON, no query or a
    shape without 3 points is a DataError naming the file."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such ReasonSeg split folder")
    records = []
    for name in sorted(f for f in os.listdir(folder) if f.lower().endswith(".jpg")):
        path, json_path = os.path.join(folder, name), os.path.join(folder, os.path.splitext(name)[0] + ".json")
        if not os.path.isfile(json_path):
            raise DataError(f"{json_path}: missing (every ReasonSeg image has a same-named .json)")
        anno = _load_json(json_path)
        texts = [t for t in anno.get("text", []) if t.strip()]
        if not texts or "shapes" not in anno:
            raise DataError(f"{json_path}: needs 'text' (non-empty queries) and 'shapes'")
        shapes = [s for s in anno["shapes"] if s["label"].lower() != "flag"]  # LISA skips these deprecated marks
        bad = [i for i, s in enumerate(shapes) if len(s["points"]) < 3]
        if bad:
            raise DataError(f"{json_path}: shapes {bad} have fewer than 3 points")
        with Image.open(path) as image:
            width, height = image.size
        records.append(dict(file_name=name, path=path, json=json_path, height=height, width=width, texts=texts,
                            is_sentence=bool(anno.get("is_sentence", False)), shapes=shapes))
    if not records:
        raise DataError(f"{folder}: no .jpg images")
    return records


def open_reasonseg(record):
    """A ReasonSeg record's image, RGB, stored pixels (no EXIF rotation: the polygons were drawn on them)."""
    with Image.open(record["path"]) as image:
        return image.convert("RGB")


def reasonseg_masks(record):
    """A ReasonSeg record -> (target, ignore) bool (H, W), painted as LISA's get_mask_from_json: polygons by
    decreasing area, a later (smaller) one over an earlier; a label containing "ignore" paints ignore, any other
    target. Polygons rasterised with pycocotools (LISA: cv2.fillPoly on integer points; edges can differ by a pixel)."""
    H, W = record["height"], record["width"]
    polys = [(decode_mask([[float(v) for p in s["points"] for v in p]], H, W), "ignore" in s["label"].lower())
             for s in record["shapes"]]
    label = np.zeros((H, W), np.uint8)  # 0 background, 1 target, 2 ignore
    for m, ignore in sorted(polys, key=lambda x: -int(x[0].sum())):  # stable: equal areas keep file order
        label[m] = 2 if ignore else 1
    return label == 1, label == 2


# ------------------------------------------------------------------------------------------------- masks

def decode_mask(segmentation, height, width):
    """COCO segmentation -> bool (height, width): the union of polygons [[x0, y0, x1, y1, ...], ...], or an RLE
    {size, counts} with compressed (str/bytes) or uncompressed (list, COCO crowd) counts. Same as pycocotools."""
    with warnings.catch_warnings():  # pycocotools 2.0.x under numpy 2 warns on every decode: harmless, only here
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword")
        return _decode_mask(segmentation, height, width)


def _decode_mask(segmentation, height, width):
    if isinstance(segmentation, list):
        if any(len(p) % 2 for p in segmentation):
            raise DataError(f"polygon with an odd number of coordinates: {[len(p) for p in segmentation]}")
        # fewer than 3 points has no area, and pycocotools would read 4 numbers as a box
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            raise DataError(f"segmentation has no polygon of 3 or more points: {segmentation}")
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif not (isinstance(segmentation, dict) and {"size", "counts"} <= set(segmentation)):
        raise DataError(f"segmentation is neither polygons nor an RLE: {str(segmentation)[:80]}")
    else:
        if list(segmentation["size"]) != [height, width]:
            raise DataError(f"RLE size {segmentation['size']} != image size {[height, width]}")
        rle = segmentation
        if isinstance(rle["counts"], list):  # uncompressed, as in COCO crowd annotations
            rle = mask_utils.frPyObjects(rle, height, width)
    return mask_utils.decode(rle).astype(bool)


def union_mask(segmentations, height, width):
    """The target of a record: bool (H, W), all False for no segmentation (a no-target expression)."""
    mask = np.zeros((height, width), bool)
    for seg in segmentations:
        mask |= decode_mask(seg, height, width)
    return mask


def load_panoptic(path):
    """Panoptic PNG -> int64 (H, W) segment ids, id = R + 256 G + 256^2 B."""
    with Image.open(path) as png:
        rgb = np.asarray(png.convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 ** 2 * rgb[..., 2]


def resize_masks(gt_masks, h, w):
    """bool (K, H, W) -> bool (K, h, w): box filter (area fraction) then >= 0.5.

    Each output pixel is the majority of its footprint on the same pixel grid PIL uses to resize the image, so the
    mask follows the image exactly and thin parts are neither shifted nor dropped as by point (nearest) sampling."""
    if gt_masks.shape[-2:] == (h, w):  # the box filter at the same size is the identity
        return torch.from_numpy(np.array(gt_masks, dtype=bool))
    out = [np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.BOX)) >= 128 for m in gt_masks]
    return torch.from_numpy(np.stack(out) if out else np.zeros((0, h, w), bool))


# ----------------------------------------------------------------------------------------------- samples

def refer_items(records, protocol):
    """Records -> items, one per sample: dict(image_id, file_name, height, width, entries), an entry per phrase
    dict(sentences, ids, segmentations | segment_ids, supervised, no_target, isthing, plural). protocol:
    "train": per image, every object once, each with all its sentences (one is drawn per epoch);
    "standard": one item per sentence (LISA/GLaMM/Sa2VA); "flmm": per image, the first sentence of each object."""
    if protocol not in ("train", "standard", "flmm"):
        raise ValueError(f"protocol must be train, standard or flmm, got {protocol!r}")

    def entry(r, k=None):
        keep = range(len(r["sentences"])) if k is None else [k]
        return dict(sentences=[r["sentences"][i] for i in keep],
                    ids=[f"{r['ref_id']}/{r['sent_ids'][i]}" for i in keep],
                    segmentations=r["segmentations"], supervised=True, no_target=r["no_target"], isthing=True,
                    plural=len(r["ann_ids"]) > 1)

    def item(r, entries):
        return dict(image_id=r["image_id"], file_name=r["file_name"], height=r["height"], width=r["width"],
                    entries=entries)

    if protocol == "standard":
        return [item(r, [entry(r, k)]) for r in records for k in range(len(r["sentences"]))]
    by_image = {}
    for r in records:
        by_image.setdefault(r["image_id"], []).append(r)
    return [item(rs[0], [entry(r, None if protocol == "train" else 0) for r in rs]) for rs in by_image.values()]


def item_targets(item):
    """bool (K, H, W): each entry's target at the stored size (the union of its segmentations, or its panoptic
    segments); all False for a no-target expression."""
    H, W = item["height"], item["width"]
    if "panoptic_file" in item:
        segment_map = load_panoptic(item["panoptic_file"])
        if segment_map.shape != (H, W):
            raise DataError(f"{item['panoptic_file']} is {segment_map.shape}, image is {(H, W)}")
        return np.stack([np.isin(segment_map, e["segment_ids"]) for e in item["entries"]])
    return np.stack([union_mask(e["segmentations"], H, W) for e in item["entries"]])


SPEC_KEYS = {"refer": {"data_root", "dataset", "split_by", "split", "image_dir"},
             "grefcoco": {"data_root", "split", "image_dir"},
             "png": {"png_json", "panoptic_json", "panoptic_dir", "image_dir"}}


def spec_name(spec):
    """A short name for a data spec, used in tables and by eval.py --split: refcoco_val, refcocog_umd_test,
    grefcoco_val, png_coco_val2017."""
    if spec.get("kind") == "refer":
        by = "" if spec["split_by"] == "unc" else f"_{spec['split_by']}"
        return f"{spec['dataset']}{by}_{spec['split']}"
    if spec.get("kind") == "grefcoco":
        return f"grefcoco_{spec['split']}"
    return os.path.splitext(os.path.basename(spec["png_json"]))[0]


def spec_files(spec):
    """The files and folders a data spec reads; a ValueError for a spec of an unknown kind or with other keys."""
    kind = spec.get("kind")
    if kind not in SPEC_KEYS or set(spec) - {"kind"} != SPEC_KEYS[kind]:
        expect = {k: sorted(v) for k, v in SPEC_KEYS.items()}
        raise ValueError(f"data spec {spec}: kind must be one of {sorted(SPEC_KEYS)} with exactly the keys {expect}")
    if kind == "png":
        return [spec["png_json"], spec["panoptic_json"], spec["panoptic_dir"], spec["image_dir"]]
    folder, refs = ((spec["dataset"], f"refs({spec['split_by']}).p") if kind == "refer" else
                    ("grefcoco", "grefs(unc).json"))
    return [os.path.join(spec["data_root"], folder, name) for name in (refs, "instances.json")] + [spec["image_dir"]]


def open_image(path):
    """A picture as a viewer shows it (EXIF orientation applied), RGB; one clear line for a missing or broken file."""
    try:
        with Image.open(path) as f:
            return ImageOps.exif_transpose(f).convert("RGB")
    except (OSError, ValueError) as e:
        raise SystemExit(f"--image {path}: cannot read it as an image ({type(e).__name__}: {e})")


def slug(text):
    return "".join(c if c.isalnum() else "_" for c in text.strip())[:40].strip("_")
