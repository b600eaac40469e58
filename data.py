"""Referring data -> qwen_inputs samples: RefCOCO/+/g and gRefCOCO (refer layout), Panoptic Narrative Grounding
(synthetic.py writes a dataset in the refer layout); the Dataset and the DataLoader.

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
import torch.distributed as dist
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

import qwen_inputs
import refiner



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


def load_refer(data_root, dataset, split_by, split, *, skip_bad=False, skipped=None):
    """RefCOCO/+/g records of one split from `data_root/<dataset>/refs(<split_by>).p` + `instances.json`.

    skip_bad=False raises DataError on an unknown ann_id/image_id or an empty sentence; skip_bad=True leaves the
    ref (or sentence) out and appends the reason to `skipped` (a list) when given."""
    refs_path = os.path.join(data_root, dataset, f"refs({split_by}).p")
    with open(refs_path, "rb") as f:
        refs = _DataOnlyUnpickler(f, refs_path).load()
    records = _ref_records(refs, refs_path, os.path.join(data_root, dataset, "instances.json"),
                           split, skip_bad, skipped)
    for r in records:
        r["ann_id"], r["segmentation"] = r["ann_ids"][0], r["segmentations"][0]
    return records


def load_grefcoco(data_root, split, *, skip_bad=False, skipped=None):
    """gRefCOCO records from `data_root/grefcoco/grefs(unc).json` + `instances.json`: one or many targets (their
    union), or none (`no_target`, empty `segmentations`). Bad entries as in `load_refer`."""
    refs_path = os.path.join(data_root, "grefcoco", "grefs(unc).json")
    return _ref_records(_load_json(refs_path), refs_path, os.path.join(data_root, "grefcoco", "instances.json"),
                        split, skip_bad, skipped)


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


def sentence_picks(item, rng):
    """The sentence drawn for each entry of an item, rng = default_rng([seed, epoch, index]) (GroundingDataset, and
    cache.py, which must draw exactly the same)."""
    return [int(rng.integers(len(e["sentences"]))) for e in item["entries"]]


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


class GroundingDataset(Dataset):
    """Items -> samples; all CPU work (image, patchify, tokenize, masks) happens in __getitem__.

    A sample: the `qwen_inputs.build_inputs` keys, `pixel_values` (gh*gw, 3*2*patch*patch) float32 (patch 14, 16 for
    Qwen3-VL), `image_grid_thw` (1, 3), `masks` bool (K, gh*patch, gw*patch) (the loss targets), `gt_masks` bool
    (K, H, W) at the stored size, and per phrase
    the lists `phrases`, `ids`, `supervised`, `no_target`, `isthing`, `plural`; plus `image_id`, `file_name`.
    The sentence drawn for an object with several depends only on (seed, epoch, index): a resumed run sees the same.
    With skip_bad, an unreadable sample is {"bad": path} (dropped and listed by `collate_skip`); items whose files
    are missing are left out at construction and listed in `self.skipped`."""

    def __init__(self, items, tokenizer, *, image_dir, image_settings=None, max_length=None, sep="\n", seed=0,
                 skip_bad=False, skipped=None, constant_phrase=None, layout="image", sam_size=0):
        self.sam_size = sam_size  # refiner.sam_image's settings (build.sam_size): also SAM's input and targets
        if layout not in ("image", "sentence"):
            raise ValueError(f"layout must be image or sentence, got {layout!r}")
        self.layout = layout  # image: all of an item's phrases in one sequence; sentence: each its own sequence
        self.skipped = [] if skipped is None else skipped  # load-time skips, messages
        start, self.items = len(self.skipped), []
        for item in items:
            paths = [os.path.join(image_dir, item["file_name"])]
            paths += [item["panoptic_file"]] if "panoptic_file" in item else []
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                _bad(f"{missing[0]}: no such file (image_id {item['image_id']}, ids {self._ids(item)})", skip_bad,
                     self.skipped)
                continue
            self.items.append(item)
        _report(image_dir, self.skipped, start)
        self.tokenizer, self.image_dir, self.sep, self.seed, self.skip_bad = tokenizer, image_dir, sep, seed, skip_bad
        # patchify's keyword arguments: the checkpoint's image settings (build.image_settings); None: Qwen2.5-VL's
        self.image_settings, self.max_length = dict(image_settings or {}), max_length
        self.patch = self.image_settings.get("patch_size", qwen_inputs.PATCH)  # masks: (K, gh*patch, gw*patch)
        self.constant_phrase = constant_phrase  # ablation: every expression replaced by this text (no language)
        # in shared memory so that set_epoch reaches DataLoader workers that already exist (persistent_workers)
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @staticmethod
    def _ids(item):
        return [e["ids"][0] for e in item["entries"]]

    def set_epoch(self, epoch):
        self.epoch.fill_(epoch)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        path = os.path.join(self.image_dir, item["file_name"])
        try:
            return self._sample(item, path, np.random.default_rng([self.seed, int(self.epoch), index]))
        except (OSError, ValueError) as e:  # unreadable image, size mismatch, aspect > 200, untokenizable phrase
            msg = f"{path} (image_id {item['image_id']}, ids {self._ids(item)}): {type(e).__name__}: {e}"
            if not self.skip_bad:
                raise DataError(msg) from e
            print(f"skipping sample: {msg}")
            return dict(bad=path)  # collate_skip drops it and reports the file

    def _sample(self, item, path, rng):
        H, W = item["height"], item["width"]
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, inside the try of __getitem__
            if (image.height, image.width) != (H, W):
                raise DataError(f"image is {image.height}x{image.width}, annotations are for {H}x{W}")
            sam = refiner.sam_image(image, **self.sam_size) if self.sam_size else {}
            pixel_values, image_grid_thw = qwen_inputs.patchify(image, **self.image_settings)
        picks = sentence_picks(item, rng)
        phrases = [self.constant_phrase or e["sentences"][k] for e, k in zip(item["entries"], picks)]
        gt = item_targets(item)  # (K, H, W)
        _, gh, gw = image_grid_thw[0].tolist()
        sample = qwen_inputs.build_inputs(self.tokenizer, image_grid_thw, phrases, sep=self.sep,
                                          max_length=self.max_length)
        flags = {key: [e[key] for e in item["entries"]] for key in ("supervised", "no_target", "isthing", "plural")}
        out = dict(sample, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                   masks=resize_masks(gt, gh * self.patch, gw * self.patch),
                   gt_masks=torch.from_numpy(gt), phrases=phrases,
                   ids=[e["ids"][k] for e, k in zip(item["entries"], picks)],
                   image_id=item["image_id"], file_name=item["file_name"], **flags)
        if sam:  # the refined masks' targets, in SAM's frame (rh, rw)
            out.update(sam, sam_masks=resize_masks(gt, *sam["sam_size"]))
        return out if self.layout == "image" else self._per_sentence(out)

    def _per_sentence(self, out):
        """One sample of K phrases -> K samples of one phrase each, each its own token sequence on the same image
        (the layout of the standard eval protocol, and of cache.py's extraction)."""
        per_phrase = ("masks", "gt_masks", "phrases", "ids", "supervised", "no_target", "isthing", "plural",
                      *(["sam_masks"] if "sam_masks" in out else []))
        return [dict(out, **qwen_inputs.build_inputs(self.tokenizer, out["image_grid_thw"], [phrase],
                                                     max_length=self.max_length),
                     **{key: out[key][k:k + 1] for key in per_phrase}) for k, phrase in enumerate(out["phrases"])]


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


def build_dataset(spec, tokenizer, *, train, protocol="standard", image_settings=None, skip_bad=False, max_length=None,
                  seed=0, constant_phrase=None, layout="image", sam_size=0):
    """A GroundingDataset from a YAML dict: {kind: refer|grefcoco|png, ...the loader's paths..., image_dir}.
    train=True draws one sentence per object per epoch, all objects of an image in one sample (layout="image": one
    token sequence; "sentence": one sequence per object); otherwise `protocol` ("standard" or "flmm") decides.
    PNG is one sample (one sequence) per narrative either way."""
    spec_files(spec)  # validates the spec
    kind = spec["kind"]
    skipped = []
    if kind == "refer":
        records = load_refer(spec["data_root"], spec["dataset"], spec["split_by"], spec["split"], skip_bad=skip_bad,
                             skipped=skipped)
    elif kind == "grefcoco":
        records = load_grefcoco(spec["data_root"], spec["split"], skip_bad=skip_bad, skipped=skipped)
    else:
        records = load_png(spec["png_json"], spec["panoptic_json"], spec["panoptic_dir"], skip_bad=skip_bad,
                           skipped=skipped)
    items = records if kind == "png" else refer_items(records, "train" if train else protocol)
    return GroundingDataset(items, tokenizer, image_dir=spec["image_dir"], image_settings=image_settings,
                            max_length=max_length, sep=" " if kind == "png" else "\n",
                            seed=seed, skip_bad=skip_bad, skipped=skipped, constant_phrase=constant_phrase,
                            layout=layout if train and kind != "png" else "image", sam_size=sam_size)


# ------------------------------------------------------------------------------------------------ loader

def collate_skip(samples):
    """qwen_inputs.collate without the unreadable samples (skip_bad); batch["skipped"] lists their files. A batch
    whose samples all failed is {"skipped": [...]} alone: skip the step, but count the files."""
    samples = [s for x in samples for s in (x if isinstance(x, list) else [x])]  # sentence layout: lists
    kept = [s for s in samples if "bad" not in s]
    batch = qwen_inputs.collate(kept) if kept else {}
    batch["skipped"] = [s["bad"] for s in samples if "bad" in s]
    return batch


class SeededSampler(DistributedSampler):
    """DistributedSampler (order = f(seed, epoch), split over ranks) that can start `skip` indices into the epoch,
    so a resumed run continues mid-epoch without loading the batches it already trained on."""
    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return super().__len__() - self.skip


def build_loader(dataset, batch_size, *, num_workers=0, shuffle=False, seed=0, drop_last=False, distributed=None,
                 collate_fn=collate_skip):
    """DataLoader over `dataset` with `collate_fn` (cache.py passes its own). The order is a function of (seed, epoch)
    only, split over ranks when torch.distributed is initialized (distributed=None: auto): call `set_epoch(loader,
    epoch)` before iterating each epoch. Evaluation (shuffle=False) gives rank r the samples r, r + world, ...: no
    padding, so under torchrun every sample is scored exactly once."""
    distributed = dist.is_available() and dist.is_initialized() if distributed is None else distributed
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    if shuffle:  # DistributedSampler permutes with seed + epoch, which is what resuming needs (also on one process)
        sampler = SeededSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    else:  # evaluation: rank r takes samples r, r + world, ...; no padding, so nothing is scored twice
        sampler = range(rank, len(dataset), world)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn, pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                      persistent_workers=num_workers > 0)


def set_epoch(loader, epoch, skip=0):
    """Set the epoch of a training loader's sampler (order) and of its dataset(s) (sentence draws); start `skip`
    batches in."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip = skip * loader.batch_size
    for ds in loader.dataset.datasets if isinstance(loader.dataset, ConcatDataset) else [loader.dataset]:
        ds.set_epoch(epoch)
