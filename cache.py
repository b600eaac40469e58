"""Extract once, train many: the frozen models' outputs (build.extract: maps, vision features, hidden states, SAM's
image embeddings) for every sentence of the training and val data, written once to memory-mapped shards and read
back instead of running the VLM (and SAM's image encoder) in every epoch of every run.

    python cache.py --cfg configs/demo.yaml cache_dir=out/demo_cache       # extract (complete shards are skipped)
    torchrun --nproc_per_node=8 cache.py --cfg configs/refcoco.yaml cache_dir=/data/cache/refcoco_3b
    python train.py --cfg configs/demo.yaml cache_dir=out/demo_cache layout=sentence

Layout: one sentence per token sequence, exactly the samples of the standard eval protocol (data.refer_items
"standard"). A phrase's maps depend on everything before it in its sequence, so they are exact only for the layout
they were extracted in. With one sentence per sequence any sentence of an object can be drawn in any epoch, the val
splits are the standard protocol as they are, and training from the cache equals online training with
layout=sentence for the same seed: the same draw (batching.EpochDraws) picks the same sentences, batched in the same
order. Extraction still runs one forward per image, not per sentence (pack_tokens > 0): a shard's sentences of one
image are packed behind one shared image prefix (qwen_inputs.build_packed), each seeing only the prefix and itself at
its own positions, so what is stored is what its own sequence gives. PNG narratives are one sequence each, as online.

Files under cache_dir:
    meta.json          what produced the cache (check_cache compares "frozen" with the config) and how ("extraction")
    config.json        the VLM's config: grounder_kwargs without loading the VLM (model_config)
    <split>/spec.json  the data spec, its number of sequences (items of its standard-protocol dataset), shard size
    <split>/00000/     shard k holds sequences [k * shard_size, (k + 1) * shard_size): index.json and one raw
                       <output>.bin per stored output (every phrase's or image's array flattened, concatenated;
                       maps.bin and maps.mean.bin: see Storage).
                       Written as a temporary directory, then renamed: a shard exists complete or not at all.

Storage is float16 (half of float32's bytes). The maps are probabilities in [0, 1]: float16 keeps 11 significant
bits (relative error <= 2^-11, ~3 significant digits) down to 6.1e-5 and subnormals down to 6e-8, where bfloat16
keeps 8 (2^-8, ~2 digits) and spends its bits on a range (to 1e38) probabilities never use. The head normalises each
map channel to sum 1 and reads its spatial pattern, i.e. its deviations from the channel's mean; so each channel is
stored as its float16 deviation from its mean plus that mean in float32 (4 bytes per channel, +0.5% at 391 image
tokens): rounding then scales with the pattern, not the level. A near-uniform channel (a random tiny VLM's maps vary
by ~2% around their mean) keeps its pattern to 2e-4 instead of 1.4% (measured); a peaked one is stored as well as
plain float16. Vision features, hidden states and SAM embeddings are activations stored as plain float16: its range
(|x| <= 65504) holds them, and an output that overflows it is an error at extraction naming the output and the
phrase, never a silent inf. Batches carry the maps in float32 (rebuilt) and the other outputs in float16 (half the
bytes through the DataLoader and to the device); the head casts them to its own dtype.
"""
import argparse
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import transformers
from torch.utils.data import DataLoader
from tqdm import tqdm

import batching
import build
import data
import model
import qwen_inputs
from build import print0

FORMAT = 1  # bump when the files change
SHARD_SIZE = 1024  # sequences per shard (~450 MiB of Qwen2.5-VL-3B maps): what a kill can lose
# build.extract's outputs: one entry per phrase, or per sequence; those that only the image decides are stored once
# per image and shard. Any other output (the selector's answer states, or one added later) is stored per sequence.
PER_PHRASE = ("maps", "hidden")
PER_IMAGE = ("vision", "sam_embeddings", "sam_intermediate", "sam_feat_s0", "sam_feat_s1", "sam_sizes")
STORAGE = torch.float16  # of every stored output (see Storage); the tests also run the cache at float32
CENTRED = ("maps",)  # stored as deviations from each channel's mean, the means in float32 (see Storage)
HERE = os.path.dirname(os.path.abspath(__file__))


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _write_json(path, obj):
    """Atomic: a temp file beside the target, then rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _jsonable(obj):
    return json.loads(json.dumps(obj))  # tuples -> lists, as meta.json reads back


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024


def code_version():
    """sha1 of the sources that decide what the frozen models compute (model.py, capture.py) and see
    (qwen_inputs.py)."""
    h = hashlib.sha1()
    for name in ("model.py", "capture.py", "qwen_inputs.py"):
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def frozen_meta(cfg):
    """What the cached outputs depend on, from the config alone: check_cache refuses a cache whose meta.json differs
    in any of these. The head's own settings (head, lr, batch_size, seed, ...) are free: a sweep reuses one cache."""
    return _jsonable(dict(
        format=FORMAT, model=cfg.model, tiny_model=cfg.tiny_model if cfg.model == "tiny" else {}, dtype=cfg.dtype,
        min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, system=qwen_inputs.SYSTEM,
        prompt=qwen_inputs.DEFAULT_PROMPT, constant_phrase=cfg.constant_phrase, vision_features=cfg.vision_features,
        refiner=_refiner_meta(cfg), selector=cfg.selector, storage=str(STORAGE).replace("torch.", ""),
        code=code_version()))


def _refiner_meta(cfg):
    """The refiner settings the frozen outputs depend on (SAM, by its weights' hash; text_layers; box), not those that
    only train (detach_mask): a run with detach_mask=true reads the same cache."""
    if not cfg.refiner:
        return {}
    frozen = {k: v for k, v in cfg.refiner.items() if k in ("sam", "text_layers", "box") and v != "mask"}
    return dict(frozen, sam_sha1=build.sam_sha1(build.sam_path(cfg)))


def _differences(stored, expected):
    return [f"{k}: the cache has {stored.get(k)!r}, the config gives {v!r}" for k, v in expected.items()
            if stored.get(k) != v] + [f"{k}: the cache has {stored[k]!r}, the config has no such field"
                                     for k in stored if k not in expected]


def _shard_dir(folder, k):
    return os.path.join(folder, f"{k:05d}")


def _num_shards(n, shard_size):
    return (n + shard_size - 1) // shard_size


def check_cache(cfg, specs):
    """Refuse (SystemExit) a cache that does not fit cfg: another model, dtype, image settings, prompt, code version
    or stored outputs (each differing field named with both values), a split that is missing, incomplete or was
    extracted from another data spec, or a config that does not train in the cached layout."""
    where = f"cache_dir={cfg.cache_dir}"
    if cfg.layout != "sentence":
        raise SystemExit(f"{where}: the cache holds one sentence per sequence; set layout=sentence (got "
                         f"{cfg.layout!r}), the layout it trains exactly")
    if cfg.protocol != "standard":
        raise SystemExit(f"{where}: the cache holds the standard protocol's sequences; protocol={cfg.protocol!r} "
                         f"puts all of an image's first sentences in one sequence and must run online")
    meta_path = os.path.join(cfg.cache_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise SystemExit(f"{meta_path}: no cache there; extract it first: python cache.py --cfg <your config> "
                         f"cache_dir={cfg.cache_dir}")
    diff = _differences(_read_json(meta_path)["frozen"], frozen_meta(cfg))
    if diff:
        raise SystemExit(f"{meta_path}: the cache does not match the config (extract another cache_dir):\n  "
                         + "\n  ".join(diff))
    for spec in specs:
        name = data.spec_name(spec)
        spec_path = os.path.join(cfg.cache_dir, name, "spec.json")
        if not os.path.isfile(spec_path):
            raise SystemExit(f"{spec_path}: split {name} is not in the cache; run python cache.py with it in "
                             f"train_data or val_data")
        split = _read_json(spec_path)
        if split["spec"] != _jsonable(spec):
            raise SystemExit(f"{spec_path}: split {name} was extracted from {split['spec']}, the config gives {spec}")
        missing = [k for k in range(_num_shards(split["sequences"], split["shard_size"]))
                   if not os.path.isdir(_shard_dir(os.path.dirname(spec_path), k))]
        if missing:
            raise SystemExit(f"{os.path.dirname(spec_path)}: shards {missing} of "
                             f"{_num_shards(split['sequences'], split['shard_size'])} are missing (an interrupted "
                             f"extraction): rerun python cache.py to complete them")


def model_config(cfg):
    """The VLM's config as the cache recorded it (what build.grounder_kwargs reads), after check_cache."""
    check_cache(cfg, [])
    return transformers.AutoConfig.from_pretrained(cfg.cache_dir)


# ------------------------------------------------------------------------------------------------- extraction

class _ShardWriter:
    """One shard being written: its sequences' outputs appended to <output>.bin files in a temporary directory, the
    index kept in memory; close() writes index.json and renames the directory into place."""

    def __init__(self, folder, k):
        self.path = _shard_dir(folder, k)
        for stale in glob.glob(f"{self.path}.tmp.*"):  # left by a killed run: shard k is this rank's alone
            shutil.rmtree(stale)
        self.tmp = f"{self.path}.tmp.{os.getpid()}"
        os.makedirs(self.tmp)
        self.files = {}
        self.index = dict(sequences=0, phrases=dict(id=[], seq=[], image=[]), images=dict(image_id=[], grid=[]),
                          arrays={}, values={}, none=[], stacked=[], skipped=[])  # arrays, values: per output
        self.image_row = {}  # image_id -> its row of index["images"]: an image's outputs are stored once per shard

    def _append(self, key, x, what, per, dtype=None):
        """x (any shape, on any device) -> `dtype` (None: STORAGE) at the end of <key>.bin; returns the bytes."""
        dtype = dtype or STORAGE
        a = x.detach().to("cpu", dtype).numpy()
        if not np.isfinite(a).all():
            raise ValueError(f"{key} of {what}: values up to {x.detach().abs().max().item():.4g} do not fit in "
                             f"{dtype} (float16: |x| <= 65504), the cache's storage")
        if key not in self.files:
            self.files[key] = open(os.path.join(self.tmp, f"{key}.bin"), "wb")
            self.index["arrays"][key] = dict(per=per, dtype=a.dtype.name, offset=[], shape=[])
        entry = self.index["arrays"][key]
        entry["offset"].append(self.files[key].tell() // a.itemsize)  # in elements
        entry["shape"].append(list(a.shape))
        self.files[key].write(a.tobytes())
        return a.nbytes

    def _append_output(self, key, x, what, per):
        if key not in CENTRED:
            return self._append(key, x, what, per)
        mean = x.float().mean((-2, -1), keepdim=True)  # (C, 1, 1)
        return self._append(key, x - mean, what, per) + self._append(f"{key}.mean", mean, what, per, torch.float32)

    def _store(self, key, value, what, per):
        """One entry of an output: a tensor into <key>.bin, anything else (sam_sizes' (rh, rw)) into the index."""
        if torch.is_tensor(value):
            return self._append_output(key, value, what, per)
        self.index["values"].setdefault(key, dict(per=per, rows=[]))["rows"].append(_jsonable(value))
        return 0

    def add(self, batch, frozen):
        """One batch (its CPU lists: ids, image_id, image_grid_thw) and its build.extract dict -> (bytes, image
        tokens) of its phrases' and sequences' outputs, and of its newly stored images' ones (the size estimate)."""
        B, P = len(batch["ids"]), len(frozen["maps"])
        for key, value in frozen.items():  # whatever extract returns is stored: per phrase, sequence or image
            if key == "phrase_image":
                continue
            if value is None:
                self.index["none"] = sorted(set(self.index["none"]) | {key})
            elif len(value) != (P if key in PER_PHRASE else B):
                raise ValueError(f"build.extract's {key!r} has {len(value)} entries for {B} sequences and {P} "
                                 f"phrases; cache.py stores {PER_PHRASE} per phrase and every other output per "
                                 f"sequence (or image)")
            elif torch.is_tensor(value) and key not in self.index["stacked"]:
                self.index["stacked"].append(key)  # one (B, ...) tensor, stacked again when read back
        stored = [k for k in frozen if k not in PER_PHRASE + ("phrase_image",) and frozen[k] is not None]
        grids = [(gh, gw) for _, gh, gw in batch["image_grid_thw"].tolist()]
        text_bytes = text_tokens = image_bytes = image_tokens = 0
        for b, image_id in enumerate(batch["image_id"]):
            seq, tokens = self.index["sequences"] + b, grids[b][0] * grids[b][1] // 4
            if image_id not in self.image_row:  # the first sequence of an image in this shard stores its outputs
                self.image_row[image_id] = len(self.index["images"]["image_id"])
                self.index["images"]["image_id"].append(image_id)
                self.index["images"]["grid"].append(list(grids[b]))
                image_tokens += tokens
                for key in stored:
                    if key in PER_IMAGE:
                        image_bytes += self._store(key, frozen[key][b], f"image {image_id}", "image")
            for key in stored:
                if key not in PER_IMAGE:
                    text_bytes += self._store(key, frozen[key][b], f"sequence {seq} ({batch['ids'][b]})", "sequence")
        ids = [i for sample in batch["ids"] for i in sample]  # batch then phrase order, as frozen["maps"]
        for p, b in enumerate(frozen["phrase_image"]):
            self.index["phrases"]["id"].append(ids[p])
            self.index["phrases"]["seq"].append(self.index["sequences"] + b)
            self.index["phrases"]["image"].append(self.image_row[batch["image_id"][b]])
            text_tokens += grids[b][0] * grids[b][1] // 4
            for key in PER_PHRASE:
                if frozen.get(key) is not None:
                    text_bytes += self._store(key, frozen[key][p], f"phrase {ids[p]}", "phrase")
        self.index["sequences"] += B
        return text_bytes, text_tokens, image_bytes, image_tokens

    def close(self):
        for f in self.files.values():
            f.close()
        _write_json(os.path.join(self.tmp, "index.json"), self.index)
        os.replace(self.tmp, self.path)  # the shard appears complete, or not at all


def _expected_bytes(settings, rates, todo, shard_size):
    """Bytes of every missing shard (all ranks): the first batch's bytes per image token, times each phrase's image
    tokens (maps, hidden states, per-sequence outputs) and each distinct image's per shard (vision features, SAM
    embeddings); settings: patchify's, which decide the image tokens."""
    phrase_bytes, phrase_tokens, image_bytes, image_tokens = rates
    side = settings["patch_size"] * settings["merge_size"]  # pixels per image token
    total = 0.0
    for _, ds, missing in todo.values():
        for k in missing:
            images = {}
            for item in ds.items[k * shard_size:(k + 1) * shard_size]:
                h, w = qwen_inputs.smart_resize(item["height"], item["width"], side, settings["min_pixels"],
                                                settings["max_pixels"])
                tokens = h * w // side ** 2
                total += phrase_bytes / max(phrase_tokens, 1) * tokens * len(item["entries"])
                images[item["image_id"]] = tokens
            total += image_bytes / max(image_tokens, 1) * sum(images.values())
    return total


def _check_disk(cfg, settings, rates, todo, shard_size):
    """Print the expected size of what is still to extract (all ranks) and refuse when the disk cannot hold it."""
    need = _expected_bytes(settings, rates, todo, shard_size)
    free = shutil.disk_usage(cfg.cache_dir).free
    sentences = sum(len(ds.items[k * shard_size:(k + 1) * shard_size]) for _, ds, missing in todo.values()
                    for k in missing)
    print0(f"{cfg.cache_dir}: about {_size(need)} to write ({_size(need / max(sentences, 1))} per sequence, "
           f"{sentences} sequences), {_size(free)} free")
    if need > free:
        raise SystemExit(f"{cfg.cache_dir}: the cache needs about {_size(need)} but the disk has {_size(free)} free; "
                         f"free space or choose another cache_dir")


def extract_all(cfg, rank=0, world=1, device=torch.device("cpu"), shard_size=SHARD_SIZE):
    """Extract cfg.train_data, cfg.val_data and cfg.test_data (the standard protocol's sequences: one sentence each;
    test_data for eval.py --cache) into
    cfg.cache_dir. Shard k holds a fixed range of sequences and rank r writes the shards k = r (mod world), so the
    files are the same for any world size; complete shards are skipped, so a rerun continues where a kill stopped.
    The VLM loads only on a rank that has a shard to write. world > 1 needs the torchrun process group."""
    if not cfg.cache_dir:
        raise SystemExit("cache.py needs cache_dir=<folder>: where the frozen outputs are written")
    if world > 1 and not dist.is_initialized():
        raise ValueError("extract_all(world > 1) needs the torchrun process group (build.init_distributed)")
    specs = list({data.spec_name(s): s for s in cfg.train_data + cfg.val_data + cfg.test_data}.items())  # each once
    build.check_data(cfg, [s for _, s in specs])
    standard = dataclasses.replace(cfg, protocol="standard", pack_tokens=0)  # one item per sentence
    meta_path = os.path.join(cfg.cache_dir, "meta.json")
    if os.path.isfile(meta_path):  # never mix the outputs of another model, image setting or code version
        diff = _differences(_read_json(meta_path)["frozen"], frozen_meta(cfg))
        if diff:
            raise SystemExit(f"{meta_path}: the cache was extracted with other settings (use another cache_dir):\n  "
                             + "\n  ".join(diff))
    todo, splits = {}, {}  # split -> (spec, dataset, missing shards of every rank); split -> its spec.json
    for name, spec in specs:
        ds = build.build_dataset(standard, None, spec, train=False, settings={})  # its items; no VLM loaded yet
        folder = os.path.join(cfg.cache_dir, name)
        todo[name] = (spec, ds, [k for k in range(_num_shards(len(ds), shard_size))
                                 if not os.path.isdir(_shard_dir(folder, k))])
        splits[name] = dict(spec=_jsonable(spec), sequences=len(ds), shard_size=shard_size)
    mine = {name: [k for k in missing if k % world == rank] for name, (_, _, missing) in todo.items()}
    if rank == 0:
        for name, split in splits.items():
            path = os.path.join(cfg.cache_dir, name, "spec.json")
            if os.path.isfile(path) and _read_json(path) != split:
                raise SystemExit(f"{path}: holds {_read_json(path)}, this run has {split}: the data or the shard size "
                                 f"changed; use another cache_dir")
    if not any(mine.values()) and (rank != 0 or os.path.isfile(meta_path)):
        qwen = None
    else:
        qwen, tokenizer = build.build_qwen(cfg, device)
        grounder = build.build_grounder(build.grounder_kwargs(cfg, qwen.config), device)
        extraction = _jsonable(dict(
            model_type=qwen.config.model_type, frozen_dtype=str(qwen.dtype).replace("torch.", ""),
            model_config_sha1=hashlib.sha1(qwen.config.to_json_string(use_diff=False).encode()).hexdigest()[:16],
            image_settings=build.image_settings(cfg, tokenizer), batch_size=cfg.batch_size, pack_tokens=cfg.pack_tokens,
            shard_size=shard_size, torch=torch.__version__.split("+")[0], transformers=transformers.__version__))
        if rank == 0 and not os.path.isfile(meta_path):
            os.makedirs(cfg.cache_dir, exist_ok=True)
            qwen.config.to_json_file(os.path.join(cfg.cache_dir, "config.json"))
            _write_json(meta_path, dict(frozen=frozen_meta(cfg), extraction=extraction))
    if rank == 0:
        for name, split in splits.items():
            if not os.path.isfile(os.path.join(cfg.cache_dir, name, "spec.json")):
                os.makedirs(os.path.join(cfg.cache_dir, name), exist_ok=True)
                _write_json(os.path.join(cfg.cache_dir, name, "spec.json"), split)
    if dist.is_initialized():
        dist.barrier()  # meta.json and spec.json exist before any shard is written
    if qwen is not None:
        diff = _differences(_read_json(meta_path)["extraction"], extraction)
        if diff:
            raise SystemExit(f"{meta_path}: its shards were extracted differently; finish them with the same "
                             f"settings, or use another cache_dir:\n  " + "\n  ".join(diff))
        if any(mine.values()):
            _extract(cfg, qwen, tokenizer, grounder, todo, mine, shard_size, device, rank)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        for name, (_, ds, _) in todo.items():
            folder = os.path.join(cfg.cache_dir, name)
            size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(folder, "[0-9]*", "*.bin")))
            print0(f"{folder}: {len(ds)} sequences, {_size(size)} ({_size(size / max(len(ds), 1))} per sequence)")


def _extract(cfg, qwen, tokenizer, grounder, todo, mine, shard_size, device, rank):
    """This rank's missing shards, split by split: one DataLoader over exactly their sequences, in batches that never
    cross a shard's boundary, so that a shard's files do not depend on what else the run extracts. With pack_tokens,
    a shard's sentences of one image share one packed row (one vision and prefix forward per image); what is stored
    is the same, one sentence per sequence."""
    autocast = build.autocast_for(cfg, device)
    standard = dataclasses.replace(cfg, protocol="standard", pack_tokens=0)
    bar = tqdm(total=sum(min(shard_size, len(todo[name][1]) - k * shard_size) for name, ks in mine.items() for k in ks),
               disable=rank != 0, unit="seq", dynamic_ncols=True, file=sys.stdout, mininterval=2)
    checked, skipped = False, []
    for name, shards in mine.items():
        if not shards:
            continue
        ds = build.build_dataset(standard, tokenizer, todo[name][0], train=False, sam_settings=build.sam_settings(grounder))
        for k in shards:
            bar.set_description(f"{name} shard {k}")
            unique, copies = _unique_sentences(ds.items[k * shard_size:(k + 1) * shard_size], ds.constant_phrase)
            shard = ds.regroup(unique, cfg.pack_tokens)
            batches = [list(range(i, min(i + cfg.batch_size, len(shard)))) for i in range(0, len(shard), cfg.batch_size)]
            loader = DataLoader(shard, batch_sampler=batches, num_workers=cfg.num_workers,
                                collate_fn=batching.collate_skip, pin_memory=device.type == "cuda")
            writer = _ShardWriter(os.path.join(cfg.cache_dir, name), k)
            for batch in loader:
                if "phrases" in batch:  # else every sample of the batch was unreadable (skip_bad): nothing to store
                    with autocast:
                        frozen = build.extract(qwen, grounder, model.to_device(batch, device))
                    view, frozen = _copies(*_per_sentence(batch, frozen), copies)
                    rates = writer.add(view, frozen)
                    if not checked:  # the expected size, from the first batch, before more than it is written
                        checked = True
                        _check_disk(cfg, build.image_settings(cfg, tokenizer), rates, todo, shard_size)
                    bar.update(len(frozen["maps"]))
                writer.index["skipped"] += batch["skipped"]  # (a skipped sentence's copies are not in the cache)
                skipped += batch["skipped"]
            writer.close()
    bar.close()
    if skipped:  # once, after the bar (skip_bad): the sequences of unreadable images are not in the cache
        print(f"rank {rank}: skipped {len(skipped)} unreadable sample(s) (skip_bad=true), e.g. {skipped[0]}")


def _per_sentence(batch, frozen):
    """A batch (packed or not) of the standard protocol's sentences, one phrase each, and its frozen outputs -> the
    same as one sequence per sentence, as the shards store it: ids, image_id, image_grid_thw and the per-image
    outputs one per sentence, each phrase's own sentence in phrase_image (the per-sentence outputs already are)."""
    if "segment_ids" not in batch:
        return batch, frozen
    row = frozen["phrase_image"]  # the packed row of each phrase, i.e. of each sentence
    view = dict(ids=[[i] for ids in batch["ids"] for i in ids], image_id=[batch["image_id"][b] for b in row],
                image_grid_thw=batch["image_grid_thw"][row])
    out = dict(frozen, phrase_image=list(range(len(row))))
    for key in PER_IMAGE:
        value = frozen.get(key)
        if value is not None:
            out[key] = batching.take(value, row)
    if frozen.get("vlm_box") is not None:  # per row, a box per phrase -> per sentence
        out["vlm_box"] = [[box] for boxes in frozen["vlm_box"] for box in boxes]
    return view, out


def _unique_sentences(items, constant_phrase=None):
    """A shard's standard-protocol items (one sentence each) -> (one item per distinct (image, sentence text), {the
    sentence id of a kept item: the ids of every sentence it stands for, for those that stand for several}). A
    sentence's frozen outputs depend only on its image and its text (its target does not enter the VLM), so an
    image's repeated sentences (two objects both "left"; every sentence of the constant-phrase baseline) are computed
    once and stored for each id. A PNG narrative (one sequence of many phrases) is kept as it is."""
    kept, copies = {}, {}
    for item in items:
        if len(item["entries"]) != 1:
            kept[len(kept), None] = item
            continue
        ids = item["entries"][0]["ids"]
        first = kept.setdefault((item["image_id"], constant_phrase or item["entries"][0]["sentences"][0]), item)
        copies.setdefault(first["entries"][0]["ids"][0], []).append(ids[0])
    return list(kept.values()), {i: c for i, c in copies.items() if len(c) > 1}


def _copies(batch, frozen, copies):
    """_per_sentence's per-sentence batch view and outputs (one phrase per sentence) -> the same with each kept
    sentence repeated for every id it stands for (_unique_sentences), the copies right after it."""
    if not any(ids[0] in copies for ids in batch["ids"]):
        return batch, frozen
    src = [p for p, (i,) in enumerate(batch["ids"]) for _ in copies.get(i, [i])]  # one phrase per sentence here
    view = dict(ids=[[i] for (first,) in batch["ids"] for i in copies.get(first, [first])],
                image_id=[batch["image_id"][p] for p in src], image_grid_thw=batch["image_grid_thw"][src])
    out = dict(frozen, phrase_image=list(range(len(src))))
    for key, value in frozen.items():
        if value is not None and key != "phrase_image":
            out[key] = batching.take(value, src)
    return view, out


def main(cfg, shard_size=SHARD_SIZE):
    rank, world, device = build.start_job(cfg)
    build.print_config(cfg)
    try:
        t0 = time.time()
        with build.one_line_data_errors():
            extract_all(cfg, rank, world, device, shard_size)
        print0(f"extracted in {time.time() - t0:.0f} s")
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default=None, help="YAML config (see configs/); cache_dir must be set")
    parser.add_argument("--shard_size", type=int, default=SHARD_SIZE, help="sequences per shard")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. cache_dir=out/cache")
    args = parser.parse_args()
    main(build.load_config(args.cfg, args.overrides), args.shard_size)
