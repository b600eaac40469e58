"""Read cache.py's shards back: the cached Dataset (a split's samples with the frozen models' outputs read from
memory-mapped shards instead of computed), its collate, and the training and val loaders built from it.

    python train.py --cfg configs/demo.yaml cache_dir=data/synthetic/cache     # extracts what is missing, then reads

See cache.py for the files and their storage; nothing here runs a frozen model or opens an image.
"""
import dataclasses
import functools
import os

import numpy as np
import torch
from torch.utils.data import ConcatDataset

import batching
import build
import data
from cache import CENTRED, PER_PHRASE, _num_shards, _read_json, _shard_dir, check_cache

def _value(v):
    return tuple(v) if isinstance(v, list) else v  # JSON wrote tuples (sam_sizes) as lists


class CachedDataset(batching.EpochDraws):
    """A split's samples as GroundingDataset gives them (layout=sentence for training, the standard protocol for
    eval), with the frozen outputs read from the cache under "frozen" instead of the model inputs: masks bool
    (k, gh*patch, gw*patch) on the grid the VLM saw and gt_masks bool (k, H, W) from the annotations (data.item_targets,
    data.resize_masks), the lists phrases, ids, supervised, no_target, isthing, plural, and image_id, file_name
    (+ sam_masks bool (k, rh, rw) when SAM's outputs are cached). The same items in the same order and the same
    sentence draws (batching.EpochDraws) as the online dataset; no image is
    opened. frozen: maps (float32) and hidden (float16) a list per phrase, the sequence's own outputs and its
    image's (float16)."""

    def __init__(self, cfg, spec, train):
        settings = _read_json(os.path.join(cfg.cache_dir, "meta.json"))["extraction"]["image_settings"]
        # the online dataset's items, order, seed, phrase rule and mask resolution (settings: the cached ones)
        online = build.build_dataset(dataclasses.replace(cfg, pack_tokens=0), None, spec, train=train, settings=settings)
        super().__init__(online.seed, online.every_sentence)
        self.items, self.image_dir, self.train = online.items, online.image_dir, train
        self.patch = online.patch  # masks: (K, gh*patch, gw*patch), as the online samples have them
        self.constant_phrase, self.skip_bad, self.skipped = online.constant_phrase, online.skip_bad, online.skipped
        self.folder = os.path.join(cfg.cache_dir, data.spec_name(spec))
        split = _read_json(os.path.join(self.folder, "spec.json"))
        self.shards = [_read_json(os.path.join(_shard_dir(self.folder, k), "index.json"))
                       for k in range(_num_shards(split["sequences"], split["shard_size"]))]
        self.where = {}  # phrase id -> (shard, row)
        for k, index in enumerate(self.shards):
            for row, pid in enumerate(index["phrases"]["id"]):
                if self.where.setdefault(pid, (k, row)) != (k, row):
                    raise ValueError(f"{self.folder}: phrase id {pid} is in shards {self.where[pid][0]} and {k}")
        self.stacked = tuple(self.shards[0]["stacked"]) if self.shards else ()
        self._mmaps = {}  # (shard, output) -> np.memmap, opened on first use in each process

    def __getstate__(self):  # DataLoader workers open their own maps
        return dict(self.__dict__, _mmaps={})

    def __len__(self):
        return len(self.items)

    def _read(self, k, key, row):
        """Row `row` of output `key` in shard k as stored (float16; float32 for the CENTRED outputs, rebuilt from
        their deviations and means), a tensor of its stored shape (a copy: the map is read-only)."""
        def stored(name):
            entry = self.shards[k]["arrays"][name]
            if (k, name) not in self._mmaps:
                path = os.path.join(_shard_dir(self.folder, k), f"{name}.bin")
                self._mmaps[k, name] = np.memmap(path, dtype=entry["dtype"], mode="r")
            offset, shape = entry["offset"][row], entry["shape"][row]
            return torch.from_numpy(np.array(self._mmaps[k, name][offset:offset + int(np.prod(shape))]).reshape(shape))
        return stored(key).float() + stored(f"{key}.mean") if key in CENTRED else stored(key)

    def __getitem__(self, index):
        item = self.items[index]
        picks, entries = self.picks(item, index), item["entries"]
        ids = [entries[j]["ids"][k] for j, k in picks]
        missing = [i for i in ids if i not in self.where]
        if missing:  # its image was unreadable at extraction (skip_bad): the whole sample is, as online
            msg = f"{self.folder}: phrases {missing} of {item['file_name']} (image {item['image_id']}) are not cached"
            if not self.skip_bad:
                raise data.DataError(msg)
            return dict(bad=msg)  # counted and reported once by the caller, as online
        of = [j for j, _ in picks]  # each phrase's entry (object)
        gt = data.item_targets(item)  # (K, H, W), one per entry
        rows = [self.where[i] for i in ids]
        k, row = rows[0]
        gh, gw = self.shards[k]["images"]["grid"][self.shards[k]["phrases"]["image"][row]]
        masks = data.resize_masks(gt, gh * self.patch, gw * self.patch)[of]  # (P, gh*patch, gw*patch), per phrase
        gt = gt[of]
        phrases = [self.constant_phrase or entries[j]["sentences"][p] for j, p in picks]
        flags = {key: [entries[j][key] for j in of] for key in ("supervised", "no_target", "isthing", "plural")}
        groups = {}  # (shard, sequence) -> the entries it holds: one per sentence; a PNG narrative holds all
        for j, (k, row) in enumerate(rows):
            groups.setdefault((k, self.shards[k]["phrases"]["seq"][row]), []).append(j)
        samples, images = [], {}  # images: (shard, row) -> its outputs, read once for all the item's sequences
        for (k, seq), js in groups.items():
            shard = self.shards[k]
            image = shard["phrases"]["image"][rows[js[0]][1]]
            if (k, image) not in images:
                images[k, image] = {key: self._read(k, key, image) for key, entry in shard["arrays"].items()
                                    if entry["per"] == "image" and not key.endswith(".mean")}
                images[k, image].update({key: _value(v["rows"][image]) for key, v in shard["values"].items()
                                         if v["per"] == "image"})
            frozen = dict({key: None for key in shard["none"]}, **images[k, image])
            for key, entry in shard["arrays"].items():
                if entry["per"] == "phrase" and not key.endswith(".mean"):  # a CENTRED output's means: read with it
                    frozen[key] = [self._read(k, key, rows[j][1]) for j in js]
                elif entry["per"] == "sequence" and not key.endswith(".mean"):
                    frozen[key] = self._read(k, key, seq)
            frozen.update({key: _value(v["rows"][seq]) for key, v in shard["values"].items() if v["per"] == "sequence"})
            sample = dict(masks=masks[js], gt_masks=torch.from_numpy(gt[js]), phrases=[phrases[j] for j in js],
                          ids=[ids[j] for j in js], image_id=item["image_id"], file_name=item["file_name"],
                          frozen=frozen, **{key: [v[j] for j in js] for key, v in flags.items()})
            if "sam_sizes" in frozen:  # the refined masks' targets, in SAM's frame, as the online dataset has them
                sample["sam_masks"] = data.resize_masks(gt[js], *frozen["sam_sizes"])
            samples.append(sample)
        if self.train:
            return samples  # one per sequence, as GroundingDataset's sentence layout (collate flattens)
        if len(samples) != 1:
            raise ValueError(f"{self.folder}: eval item {index} spans {len(samples)} cached sequences, expected 1")
        return samples[0]


def collate(samples, stacked=()):
    """Cached samples (or lists of them) -> a batch with the keys batching.collate_skip gives a loss and eval
    (lists per sample), "skipped", and "frozen": the build.extract dict of the batch (per-phrase outputs in batch
    then phrase order, phrase_image the sample of each phrase, the other outputs one per sample, the `stacked` ones
    as one (B, ...) tensor), as CachedDataset reads them (maps float32, the rest float16)."""
    samples = [s for x in samples for s in (x if isinstance(x, list) else [x])]
    kept = [s for s in samples if "bad" not in s]
    batch = dict(skipped=[s["bad"] for s in samples if "bad" in s])
    if not kept:
        return batch
    batch.update({key: [s[key] for s in kept] for key in kept[0] if key != "frozen"})
    frozen = dict(phrase_image=[b for b, s in enumerate(kept) for _ in s["ids"]])
    for key, first in kept[0]["frozen"].items():
        values = [s["frozen"][key] for s in kept]
        frozen[key] = (None if first is None else [x for v in values for x in v] if key in PER_PHRASE else
                       torch.stack(values) if key in stacked else values)
    frozen["same_as"] = _repeats(kept, frozen)
    batch["frozen"] = frozen
    return batch


def _repeats(samples, frozen):
    """Per phrase of a cached batch, the first phrase of the batch with the same image and text whose stored maps
    and vision features are equal to its own (itself if none): the mask head runs once for them (heads.MaskHead's
    same_as), exactly. Every phrase of the constant-phrase baseline repeats its image's first; an image's repeated
    sentence (two objects both "left") does too. Compared on the CPU, in the loader, only where image and text match."""
    keys = [(s["image_id"], p) for s in samples for p in s["phrases"]]
    maps, vision, image = frozen["maps"], frozen.get("vision"), frozen["phrase_image"]
    first, same_as = {}, []
    for p, key in enumerate(keys):
        q = first.setdefault(key, p)
        same = q != p and torch.equal(maps[p], maps[q]) and (vision is None or torch.equal(vision[image[p]],
                                                                                            vision[image[q]]))
        same_as.append(q if same else p)
    return same_as


def build_train_loader(cfg):
    """build.build_train_loader from the cache: the same images in the same order (seed, epoch), the same sentence
    draws and batches as online training with layout=sentence; batching.set_epoch and the sampler's skip (resume) work
    as there."""
    check_cache(cfg, cfg.train_data)
    sets = [CachedDataset(cfg, spec, train=True) for spec in cfg.train_data]
    return batching.build_loader(sets[0] if len(sets) == 1 else ConcatDataset(sets), cfg.batch_size,
                             num_workers=cfg.num_workers, shuffle=True, seed=cfg.seed, drop_last=True,
                             collate_fn=functools.partial(collate, stacked=sets[0].stacked))


def build_val_loaders(cfg, specs):
    """build.build_val_loaders from the cache: {split name: (loader, spec)}, the standard protocol."""
    check_cache(cfg, specs)
    loaders = {}
    for spec in specs:
        ds = CachedDataset(cfg, spec, train=False)
        loaders[data.spec_name(spec)] = (batching.build_loader(ds, cfg.batch_size, num_workers=cfg.num_workers,
                                                           collate_fn=functools.partial(collate, stacked=ds.stacked)),
                                         spec)
    return loaders
