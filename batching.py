"""Records -> batches: the torch Dataset (image, patchify, tokens, masks in the DataLoader workers), its three layouts
(all of an image's phrases in one sequence; one sequence per sentence; an image's sentences packed behind one shared
image prefix, in rows of at most pack_tokens tokens: split_packed), the seeded sampler that resumes mid-epoch, and
the DataLoader."""
import copy
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

import data
import qwen_inputs
import refiner
from data import DataError, _bad, _report


class EpochDraws(Dataset):
    """What the online dataset (GroundingDataset) and the cached one (cached.CachedDataset) share, so that both draw
    exactly the same sentences: the epoch counter, in shared memory so that `set_epoch` reaches DataLoader workers
    that already exist (persistent_workers), and the draw of one sentence per entry of an item, a function of
    (seed, epoch, index) only (a resumed run draws the same); or, with every_sentence, all of them."""

    def __init__(self, seed, every_sentence=False):
        self.seed, self.every_sentence = seed, every_sentence
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch):
        self.epoch.fill_(epoch)

    def picks(self, item, index):
        """The phrases of `item` (the dataset's item `index`) in the current epoch, as (entry, sentence) index pairs:
        one sentence drawn per entry, or every sentence of every entry (every_sentence: each its own phrase)."""
        if self.every_sentence:
            return [(j, k) for j, e in enumerate(item["entries"]) for k in range(len(e["sentences"]))]
        rng = np.random.default_rng([self.seed, int(self.epoch), index])
        return [(j, int(rng.integers(len(e["sentences"])))) for j, e in enumerate(item["entries"])]


class GroundingDataset(EpochDraws):
    """Items -> samples; all CPU work (image, patchify, tokenize, masks) happens in __getitem__.

    A sample: the `qwen_inputs.build_inputs` keys, `pixel_values` (gh*gw, 3*2*patch*patch) float32 (patch 14, 16 for
    Qwen3-VL), `image_grid_thw` (1, 3), `masks` bool (K, gh*patch, gw*patch) (the loss targets), `gt_masks` bool
    (K, H, W) at the stored size, and per phrase
    the lists `phrases`, `ids`, `supervised`, `no_target`, `isthing`, `plural`; plus `image_id`, `file_name`.
    The sentence drawn for an object with several depends only on (seed, epoch, index): a resumed run sees the same.
    With skip_bad, an unreadable sample is {"bad": message naming the file} (dropped and listed by `collate_skip`);
    items whose files are missing are left out at construction and listed in `self.skipped`."""

    def __init__(self, items, tokenizer, *, image_dir, image_settings=None, max_length=None, sep="\n", seed=0,
                 skip_bad=False, skipped=None, constant_phrase=None, layout="image", pack_tokens=0, sam_settings=None,
                 every_sentence=False):
        self.sam_settings = sam_settings or {}  # refiner.sam_image's keyword arguments: also SAM's input and targets
        if layout not in ("image", "sentence"):
            raise ValueError(f"layout must be image or sentence, got {layout!r}")
        self.layout = layout  # image: all of an item's phrases in one sequence; sentence: each phrase independent
        # sentence layout: > 0 packs an item's sentences behind one shared prefix (qwen_inputs.build_packed), rows of
        # at most this many tokens; 0: each sentence its own sequence. Either way each sentence's outputs are its own.
        self.pack_tokens = pack_tokens
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
        if every_sentence and layout != "sentence":  # in one sequence an object's sentences would see each other
            raise ValueError("every sentence of each object (train_sentences: all) needs layout=sentence")
        super().__init__(seed, every_sentence)
        self.tokenizer, self.image_dir, self.sep, self.skip_bad = tokenizer, image_dir, sep, skip_bad
        # patchify's keyword arguments: the checkpoint's image settings (build.image_settings); None: Qwen2.5-VL's
        self.image_settings, self.max_length = dict(image_settings or {}), max_length
        self.patch = self.image_settings.get("patch_size", qwen_inputs.PATCH)  # masks: (K, gh*patch, gw*patch)
        self.constant_phrase = constant_phrase  # ablation: every expression replaced by this text (no language)

    @staticmethod
    def _ids(item):
        return [e["ids"][0] for e in item["entries"]]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        path = os.path.join(self.image_dir, item["file_name"])
        try:
            return self._sample(item, path, self.picks(item, index))
        except (OSError, ValueError) as e:  # unreadable image, size mismatch, aspect > 200, untokenizable phrase
            msg = f"{path} (image_id {item['image_id']}, ids {self._ids(item)}): {type(e).__name__}: {e}"
            if not self.skip_bad:
                raise DataError(msg) from e
            return dict(bad=msg)  # collate_skip drops it; the caller counts and reports the messages once

    def _sample(self, item, path, picks):
        H, W = item["height"], item["width"]
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, inside the try of __getitem__
            if (image.height, image.width) != (H, W):
                raise DataError(f"image is {image.height}x{image.width}, annotations are for {H}x{W}")
            sam = refiner.sam_image(image, **self.sam_settings) if self.sam_settings else {}
            pixel_values, image_grid_thw = qwen_inputs.patchify(image, **self.image_settings)
        entries, js = item["entries"], [j for j, _ in picks]  # js: each phrase's entry (object)
        phrases = [self.constant_phrase or entries[j]["sentences"][k] for j, k in picks]
        gt = data.item_targets(item)  # (K, H, W), one per entry
        _, gh, gw = image_grid_thw[0].tolist()
        flags = {key: [entries[j][key] for j in js] for key in ("supervised", "no_target", "isthing", "plural")}
        out = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                   masks=data.resize_masks(gt, gh * self.patch, gw * self.patch)[js],
                   gt_masks=torch.from_numpy(gt[js]), phrases=phrases,
                   ids=[entries[j]["ids"][k] for j, k in picks],
                   image_id=item["image_id"], file_name=item["file_name"], **flags)
        if sam:  # the refined masks' targets, in SAM's frame (rh, rw)
            out.update(sam, sam_masks=data.resize_masks(gt, *sam["sam_size"])[js])
        if self.layout == "image":  # one sequence, the phrases joined by sep
            return dict(out, **self._checked(qwen_inputs.build_inputs(self.tokenizer, image_grid_thw, phrases,
                                                                      sep=self.sep)))
        if not self.pack_tokens:  # one sequence per sentence, the standard protocol's layout
            rows = [(qwen_inputs.build_inputs(self.tokenizer, image_grid_thw, [p]), [k]) for k, p in enumerate(phrases)]
        else:  # the same sentences behind one shared prefix (rows of at most pack_tokens tokens)
            rows = split_packed(qwen_inputs.build_packed(self.tokenizer, image_grid_thw, [[p] for p in phrases]),
                                self.pack_tokens)
        per_phrase = [key for key, v in out.items() if isinstance(v, list) or key in ("masks", "gt_masks", "sam_masks")]
        return [dict(out, **self._checked(tokens), **{key: take(out[key], ks) for key in per_phrase})
                for tokens, ks in rows]

    def regroup(self, items, pack_tokens):
        """This dataset over other `items` of its kind (cache.py: a shard's standard-protocol sentences, one entry
        each): with pack_tokens > 0 each image's sentences in one sample, packed behind one shared prefix (rows of at
        most pack_tokens tokens); else one sample per item as given."""
        view = copy.copy(self)
        view.items = by_image(items) if pack_tokens else list(items)
        view.layout, view.pack_tokens = ("sentence", pack_tokens) if pack_tokens else (self.layout, 0)
        return view

    def _checked(self, tokens):
        if self.max_length is not None and len(tokens["input_ids"]) > self.max_length:
            raise ValueError(f"{len(tokens['input_ids'])} tokens exceed max_length={self.max_length}; lower "
                             f"max_pixels (fewer image tokens), or pack_tokens with the sentence layout")
        return tokens


def take(values, ks):
    """The entries ks of a per-phrase list or (K, ...) tensor (cache.py also takes per-sentence outputs with it)."""
    return values[ks] if torch.is_tensor(values) else [values[k] for k in ks]


def split_packed(sample, max_tokens):
    """A packed sample -> a list of (packed sample, the indices of its sentences), each at most `max_tokens` long
    where possible: the sentences go, in order, into as many samples as needed, each with its own copy of the prefix
    (a sentence too long for the cap alone gets a sample of its own). max_tokens <= 0: the sample as it is."""
    seg = sample["segment_ids"]
    prefix = int((seg == 0).sum())  # the prefix is the leading run of segment 0
    lengths = torch.bincount(seg, minlength=int(seg.max()) + 1)[1:].tolist()
    rows = [[]]
    for s, n in enumerate(lengths):
        if rows[-1] and max_tokens > 0 and prefix + sum(lengths[t] for t in rows[-1]) + n > max_tokens:
            rows.append([])
        rows[-1].append(s)
    if len(rows) == 1:
        return [(sample, rows[0])]
    out = []
    for row in rows:
        keep = torch.cat([torch.arange(prefix), *[(seg == s + 1).nonzero().flatten() for s in row]])
        part = {k: v[keep] for k, v in sample.items()}
        phrases = part["mask_ids"] >= 0
        part["mask_ids"][phrases] -= int(part["mask_ids"][phrases].min())  # number the row's phrases from 0
        part["segment_ids"][prefix:] -= row[0]
        out.append((part, row))
    return out


def build_dataset(spec, tokenizer, *, train, protocol="standard", image_settings=None, skip_bad=False, max_length=None,
                  seed=0, constant_phrase=None, layout="image", pack_tokens=0, sam_settings=None, every_sentence=False):
    """A GroundingDataset from a YAML dict: {kind: refer|grefcoco|png, ...the loader's paths..., image_dir}.
    train=True draws one sentence per object per epoch (every_sentence: all of them, with layout="sentence"), all
    objects of an image in one sample (layout="image": one token sequence; "sentence": each object's sentence
    independent, packed behind one prefix when pack_tokens > 0);
    otherwise `protocol` ("standard" or "flmm") decides; the standard protocol's sentences are packed per image when
    pack_tokens > 0 (each still scored as alone). PNG is one sample (one sequence) per narrative either way."""
    data.spec_files(spec)  # validates the spec
    kind = spec["kind"]
    skipped = []
    if kind == "refer":
        records = data.load_refer(spec["data_root"], spec["dataset"], spec["split_by"], spec["split"], skip_bad=skip_bad,
                             skipped=skipped)
    elif kind == "grefcoco":
        records = data.load_grefcoco(spec["data_root"], spec["split"], skip_bad=skip_bad, skipped=skipped)
    else:
        records = data.load_png(spec["png_json"], spec["panoptic_json"], spec["panoptic_dir"], skip_bad=skip_bad,
                           skipped=skipped)
    items = records if kind == "png" else data.refer_items(records, "train" if train else protocol)
    if kind == "png" or not train:  # eval: one sequence per sample of the protocol ...
        layout = "image"
    if kind != "png" and not train and protocol == "standard" and pack_tokens:
        items, layout = by_image(items), "sentence"  # ... or every sentence of an image behind one prefix
    return GroundingDataset(items, tokenizer, image_dir=spec["image_dir"], image_settings=image_settings,
                            max_length=max_length, sep=" " if kind == "png" else "\n",
                            seed=seed, skip_bad=skip_bad, skipped=skipped, constant_phrase=constant_phrase,
                            layout=layout, pack_tokens=pack_tokens, sam_settings=sam_settings,
                            every_sentence=every_sentence and train and kind != "png")  # a narrative: its phrases


def by_image(items):
    """Items -> one item per image (first-seen order) holding all their entries in order."""
    out = {}
    for item in items:
        if item["image_id"] in out:
            out[item["image_id"]]["entries"] += item["entries"]
        else:
            out[item["image_id"]] = dict(item, entries=list(item["entries"]))
    return list(out.values())


def picture_samples(tokenizer, settings, image, phrases, image_id=0, pack_tokens=None, sam_settings=None):
    """One PIL image and its phrases -> the samples qwen_inputs.collate takes (+ SAM's input with sam_settings,
    build.sam_settings), their phrases in order. pack_tokens=None: one sequence holding all the phrases (F-LMM's
    layout); an int: each phrase an independent sentence (the standard protocol), packed behind one shared image
    prefix in rows of at most that many tokens (0: a sequence each). settings: patchify's (build.image_settings)."""
    pixel_values, grid = qwen_inputs.patchify(image, **settings)
    if pack_tokens is None:
        rows = [qwen_inputs.build_inputs(tokenizer, grid, phrases)]
    elif pack_tokens:
        rows = [r for r, _ in split_packed(qwen_inputs.build_packed(tokenizer, grid, [[p] for p in phrases]),
                                           pack_tokens)]
    else:
        rows = [qwen_inputs.build_inputs(tokenizer, grid, [p]) for p in phrases]
    sam = refiner.sam_image(image, **sam_settings) if sam_settings else {}
    return [dict(r, pixel_values=pixel_values, image_grid_thw=grid, image_id=image_id, **sam) for r in rows]


def collate_skip(samples):
    """qwen_inputs.collate without the unreadable samples (skip_bad); batch["skipped"] lists their files. A batch
    whose samples all failed is {"skipped": [...]} alone: skip the step, but count the files."""
    samples = [s for x in samples for s in (x if isinstance(x, list) else [x])]  # sentence layout: lists
    kept = [s for s in samples if "bad" not in s]
    batch = qwen_inputs.collate(kept) if kept else {}
    batch["skipped"] = [s["bad"] for s in samples if "bad" in s]
    return batch


class SeededSampler(DistributedSampler):
    """DistributedSampler (order = f(seed, epoch), split over ranks) whose epoch can start part-way in:
    `set_epoch(epoch, start)` makes the next iteration begin at this rank's sample `start`, so a resumed run continues
    mid-epoch without loading the samples it already trained on."""

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start  # in samples of this rank's share

    def __iter__(self):
        return iter(list(super().__iter__())[getattr(self, "start", 0):])

    def __len__(self):
        return super().__len__() - getattr(self, "start", 0)


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


def set_epoch(loader, epoch, start_batch=0):
    """Set the epoch of a training loader's sampler (order) and of its dataset(s) (sentence draws); the epoch's
    iteration begins at its batch `start_batch` (resume), the batches before it are never loaded."""
    loader.sampler.set_epoch(epoch, start=start_batch * loader.batch_size)
    for ds in loader.dataset.datasets if isinstance(loader.dataset, ConcatDataset) else [loader.dataset]:
        ds.set_epoch(epoch)
