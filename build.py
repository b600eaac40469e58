"""Everything train.py, eval.py and the other scripts build from a config: the Config, the frozen VLM, the trainable
Grounder, the datasets and loaders, the torchrun setup and the checkpoint reader.

    cfg = load_config("configs/demo.yaml", ["batch_size=8"])
    qwen, tokenizer = build_qwen(cfg, device); grounder, kwargs = build_grounder(cfg, qwen)
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import zipfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import yaml

import data
import head as heads
import model
import refiner
import selector as selection
import synthetic

DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class Config:
    # model
    model: str = "Qwen/Qwen2.5-VL-3B-Instruct"  # local dir or Hub id; "tiny" builds the demo model (seeded) once
    tiny_model: dict = field(default_factory=dict)  # synthetic.build_tiny_qwen kwargs when model == "tiny"
    dtype: str = "bfloat16"  # frozen VLM weights and autocast on CUDA (bfloat16|float16|float32); CPU: float32
    shard: bool = False  # FSDP2: every torchrun rank holds 1/world of the frozen VLM (models larger than one GPU)
    head: dict = field(default_factory=dict)  # MaskHead kwargs beyond the channels (base, size)
    vision_features: bool = False  # also feed the frozen vision tower's patch features to the head's decoder
    refiner: dict = field(default_factory=dict)  # F-LMM's SAM refiner; empty = off. sam: Hub id, local dir, "tiny"
    # (random) or "synthetic" (the demo's: tiny, trained on the synthetic masks once); text_layers: how many last VLM
    # layers' hidden states form its text prompt (0 = all, as F-LMM)
    selector: dict = field(default_factory=dict)  # the learned phrase selector (chat.py); empty = off. layers: how
    # many last VLM layers' hidden states of the answer tokens it reads (0 = all); width: its channels (default 128)
    # data
    synthetic: dict = field(default_factory=dict)  # synthetic.make_synthetic kwargs; written once, then reused
    train_data: list = field(default_factory=list)  # data.build_dataset specs, mixed by concatenation
    val_data: list = field(default_factory=list)  # specs scored by the periodic eval and at the end
    test_data: list = field(default_factory=list)  # specs eval.py scores (default: val_data)
    protocol: str = "standard"  # eval protocol: standard (every sentence) or flmm (first sentence, per image)
    layout: str = "image"  # training sequences: image (all objects of an image in one) or sentence (one per object,
    # as the standard eval protocol and cache.py lay them out)
    constant_phrase: str = ""  # ablation: every expression replaced by this text (no language -> saliency only)
    min_pixels: int = 0  # smart_resize bounds overriding the checkpoint's (0: its preprocessor_config.json's)
    max_pixels: int = 0
    max_length: int = 4096  # longest token sequence allowed (a clear error above it)
    skip_bad: bool = False  # skip and count broken images / annotations instead of stopping
    num_workers: int = 4  # DataLoader workers per process: decode, patchify, tokenize, masks
    cache_dir: str = ""  # train/eval from the frozen outputs cache.py extracted here (no VLM loads); "" = online
    # optimisation (F-LMM's recipe)
    batch_size: int = 16  # images PER PROCESS per micro-step (global: x grad_accum x processes); all referred
    # objects of an image in one sequence
    grad_accum: int = 1  # micro-steps per optimiser step
    epochs: float = 8.0
    max_steps: int = 0  # > 0 overrides epochs
    lr: float = 1.0e-4  # peak learning rate at a global batch of lr_batch images
    lr_batch: int = 0  # > 0: scale lr by sqrt(global batch / lr_batch) (F-LMM: 1e-4 at 8); 0: lr as given
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    warmup: float = 0.03  # fraction of the steps with linear warm-up, then cosine to 0
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: torch's default); 1 is often fastest for tiny models on small CPUs
    # bookkeeping
    out_dir: str = "out/refcoco"
    resume: bool = False  # continue from out_dir/ckpt.pt (same data order, RNG, optimizer, step); an error if none
    log_every: int = 10  # steps between log lines (loss averaged over them), tensorboard scalars, non-finite checks
    eval_every: int = 2000  # steps between periodic evals (0: only at the end)
    eval_batches: int = 0  # > 0: cap the periodic eval at this many batches (the final eval scores everything)
    ckpt_every: int = 500  # steps between checkpoints (always at the end)
    vis_every: int = 500  # steps between tensorboard images of predicted vs true masks (0: never)
    vis_samples: int = 4  # overlay PNGs of the first val scenes (one per image) written to out_dir/vis at the end
    baselines: bool = False  # demo: also score a random object and train the constant-phrase ablation
    baseline_phrase: str = "the object"  # the constant phrase of that ablation


class _StrictBoolLoader(yaml.SafeLoader):
    """YAML 1.1 reads yes/no/on/off as booleans (resume=yes would silently mean true): only true/false are."""


_StrictBoolLoader.yaml_implicit_resolvers = {
    k: [(tag, regexp) for tag, regexp in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()}
_StrictBoolLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                        list("tTfF"))


def _yaml(text):
    return yaml.load(text, Loader=_StrictBoolLoader)


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
    cfg = Config(**out)
    if cfg.dtype not in DTYPES:
        raise SystemExit(f"{where}: dtype must be one of {DTYPES}, got {cfg.dtype!r}")
    if cfg.layout not in ("image", "sentence"):
        raise SystemExit(f"{where}: layout must be image or sentence, got {cfg.layout!r}")
    if cfg.protocol not in ("standard", "flmm"):
        raise SystemExit(f"{where}: protocol must be standard or flmm, got {cfg.protocol!r}")
    for key in ("batch_size", "grad_accum"):
        if getattr(cfg, key) < 1:
            raise SystemExit(f"{where}: {key} must be >= 1, got {getattr(cfg, key)}")
    return cfg


def load_config(path=None, overrides=()):
    """YAML file + key=value overrides (values parsed as YAML, booleans only as true/false) -> Config."""
    raw = {}
    if path:
        with open(path) as f:
            raw = _yaml(f) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r} is not key=value")
        raw[key] = _yaml(value)
    return config_from_dict(raw, path or "overrides")


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def init_distributed():
    """The torchrun environment -> (rank, world, device): the process group initialised when WORLD_SIZE > 1 (NCCL on
    CUDA, gloo on the CPU) and this rank's GPU made current, which NCCL collectives rely on."""
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


def start_job(cfg):
    """What every job script does first: torchrun setup (init_distributed), cfg.threads, and the synthetic data
    (written once, by rank 0, the others waiting) when the config uses it -> (rank, world, device)."""
    rank, world, device = init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.synthetic:
        if rank == 0:
            synthetic.make_synthetic(**cfg.synthetic)
        if world > 1:
            dist.barrier()
    return rank, world, device


def autocast_for(cfg, device):
    """bf16 (or fp16) autocast on CUDA; float32 and the CPU run without."""
    if device.type == "cuda" and cfg.dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, cfg.dtype))
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------- models

def build_qwen(cfg, device):
    """The frozen VLM and its tokenizer; "tiny" writes the demo model once (seeded) and loads it back."""
    dtype = getattr(torch, cfg.dtype) if device.type == "cuda" else torch.float32
    path = cfg.model
    if path == "tiny":  # one directory per build_tiny_qwen kwargs: another tiny_model never reuses a stale one
        tag = hashlib.sha1(json.dumps(cfg.tiny_model, sort_keys=True).encode()).hexdigest()[:8]
        path = os.path.join(cfg.synthetic.get("root", "data/synthetic"), f"tiny_qwen-{tag}")
        written = all(os.path.exists(os.path.join(path, f)) for f in ("config.json", "preprocessor_config.json"))
        if not written and int(os.environ.get("RANK", 0)) == 0:  # (older builds wrote no preprocessor_config.json)
            synthetic.build_tiny_qwen(path, synthetic.synthetic_texts(), **cfg.tiny_model)
        if dist.is_initialized():
            dist.barrier()
    return model.load_qwen(path, dtype=dtype, device=device, shard=cfg.shard)


def image_settings(cfg, tokenizer):
    """The patchify keyword arguments: the checkpoint's (load_qwen puts them on the tokenizer), with the config's
    min_pixels / max_pixels where they are set."""
    overrides = {k: getattr(cfg, k) for k in ("min_pixels", "max_pixels") if getattr(cfg, k)}
    return {**tokenizer.image_settings, **overrides}


def grounder_kwargs(cfg, config):
    """The constructor arguments of the trainable modules for this VLM's config (`qwen.config`, or a cache's
    `cache.model_config`; saved in the checkpoint)."""
    text, vision = config.text_config, config.vision_config
    head = dict(in_channels=text.num_hidden_layers * text.num_attention_heads,
                vision_channels=model.vision_channels(config) if cfg.vision_features else 0,
                token_px=vision.patch_size * vision.spatial_merge_size, **cfg.head)
    refine = None
    if cfg.refiner:
        unknown = sorted(set(cfg.refiner) - {"sam", "text_layers"})
        if unknown or "sam" not in cfg.refiner:
            raise SystemExit(f"refiner: needs sam (a Hub id, a local dir, tiny, tiny_<family> or synthetic) and "
                             f"optionally text_layers; got {cfg.refiner}")
        sam = cfg.refiner["sam"]
        tiny = {"tiny": "sam", **{f"tiny_{family}": family for family in refiner.FAMILIES}}  # random tiny SAMs
        if sam in tiny or sam == "synthetic":  # random, or the demo's (trained on the synthetic world): written once
            root = cfg.synthetic.get("root", "data/synthetic")
            name, sam = sam, os.path.join(root, f"{sam}_sam")
            if not os.path.exists(os.path.join(sam, "config.json")) and int(os.environ.get("RANK", 0)) == 0:
                if name in tiny:
                    refiner.build_tiny_sam(sam, family=tiny[name])
                else:
                    print(f"training the demo's tiny SAM on {root}'s training masks from box prompts (once) -> {sam}")
                    synthetic.build_synthetic_sam(sam, root)
            if dist.is_initialized():
                dist.barrier()
        layers = cfg.refiner.get("text_layers", 0) or text.num_hidden_layers
        if not 0 < layers <= text.num_hidden_layers:
            raise SystemExit(f"refiner.text_layers must be in 1..{text.num_hidden_layers} (0 = all), got {layers}")
        refine = dict(sam=sam, hidden_size=text.hidden_size, text_layers=layers)
    kwargs = dict(head=head, refiner=refine)
    if cfg.selector:  # the key only with a selector: older checkpoints' kwargs stay equal (resume compares them)
        unknown = sorted(set(cfg.selector) - {"layers", "width"})
        layers = cfg.selector.get("layers", 0) or text.num_hidden_layers
        if unknown or not 0 < layers <= text.num_hidden_layers:
            raise SystemExit(f"selector: takes layers (1..{text.num_hidden_layers}, 0 = all) and width; got "
                             f"{cfg.selector}")
        kwargs["selector"] = dict(hidden_size=text.hidden_size, layers=layers, width=cfg.selector.get("width", 128))
    return kwargs


def build_grounder(kwargs, device="cpu"):
    """Grounder from grounder_kwargs (or a checkpoint's copy of them): the MaskHead, and the Refiner around the SAM
    named there (its frozen image encoder loaded from that checkpoint, never saved with ours)."""
    refine = None
    if kwargs["refiner"]:
        r = kwargs["refiner"]
        refine = refiner.Refiner(refiner.load_sam(r["sam"], device=device), hidden_size=r["hidden_size"],
                                 text_layers=r["text_layers"])
    select = selection.Selector(**kwargs["selector"]) if kwargs.get("selector") else None
    return heads.Grounder(heads.MaskHead(**kwargs["head"]), refine, select).to(device)


def sam_size(grounder):
    """SAM's input settings for this grounder's refiner (refiner.sam_image keyword arguments: size, square, mean,
    std; {} without one): what the data loader prepares."""
    grounder = getattr(grounder, "module", grounder)
    return grounder.refiner.image_settings if grounder.refiner is not None else {}


@torch.no_grad()
def extract(qwen, grounder, batch):
    """What the grounder reads from the frozen models for one batch on the device: model.frozen_outputs with the
    vision features and hidden states it needs (+ SAM's image embeddings with a refiner)."""
    if "frozen" in batch:  # read from cache.py's files (to_device moved it): the frozen models never ran
        return batch["frozen"]
    grounder = getattr(grounder, "module", grounder)  # DDP-wrapped or not
    refine = grounder.refiner
    select = grounder.selector
    frozen = model.frozen_outputs(qwen, batch, vision=grounder.head.vision_channels > 0,
                                  hidden_layers=refine.layer_weights.numel() if refine is not None else 0,
                                  answer_layers=select.layer_weights.numel() if select is not None else 0)
    if refine is not None:  # SAM's image encoder once per distinct image (the sentence layout repeats images)
        row = {}  # image_id -> its row among the distinct images, in first-seen order
        for image_id in batch["image_id"]:
            row.setdefault(image_id, len(row))
        first = {image_id: i for i, image_id in reversed(list(enumerate(batch["image_id"])))}
        image = refine.image_embeddings(torch.stack([batch["sam_pixel_values"][first[i]] for i in row]))
        index = torch.tensor([row[image_id] for image_id in batch["image_id"]], device=image["sam_embeddings"].device)
        frozen.update({k: v[index] for k, v in image.items()}, sam_sizes=batch["sam_size"])
    return frozen


# --------------------------------------------------------------------------------------------------- data

def check_data(cfg, specs):
    """Before any model loads: every file and folder the data specs name exists (one message listing the missing)."""
    missing = [f"{data.spec_name(s)}: {p}" for s in specs for p in data.spec_files(s) if not os.path.exists(p)]
    if missing:
        raise SystemExit("data not found (paths are relative to where you run the script):\n  " + "\n  ".join(missing))


def build_dataset(cfg, tokenizer, spec, train, sam_side=0, settings=None):
    """settings: patchify's keyword arguments (None: image_settings(cfg, tokenizer)); cache.py passes those its files
    were extracted with, and no tokenizer."""
    settings = image_settings(cfg, tokenizer) if settings is None else settings
    return data.build_dataset(spec, tokenizer, train=train, protocol=cfg.protocol, image_settings=settings,
                              skip_bad=cfg.skip_bad,
                              max_length=cfg.max_length,
                              seed=cfg.seed, constant_phrase=cfg.constant_phrase or None, layout=cfg.layout,
                              sam_size=sam_side)


def build_train_loader(cfg, tokenizer, sam_side=0):
    sets = [build_dataset(cfg, tokenizer, spec, train=True, sam_side=sam_side) for spec in cfg.train_data]
    train_set = sets[0] if len(sets) == 1 else torch.utils.data.ConcatDataset(sets)
    return data.build_loader(train_set, cfg.batch_size, num_workers=cfg.num_workers, shuffle=True, seed=cfg.seed,
                             drop_last=True)


def build_val_loaders(cfg, tokenizer, specs, sam_side=0):
    """{split name: (loader, spec)} for eval, in the config's order."""
    return {data.spec_name(spec): (data.build_loader(build_dataset(cfg, tokenizer, spec, train=False, sam_side=sam_side),
                                                     cfg.batch_size, num_workers=cfg.num_workers), spec)
            for spec in specs}


# ------------------------------------------------------------------------------------------------ checkpoint

def load_checkpoint(path):
    """A train.py checkpoint -> its dict, or one clear line (SystemExit) for anything else at that path."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such checkpoint")
    if not zipfile.is_zipfile(path):
        raise SystemExit(f"{path}: not a train.py checkpoint (not a torch zip file; is it a config or an image?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError) as e:  # truncated or from another program
        raise SystemExit(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    need = {"config", "grounder", "grounder_kwargs", "step"}
    if not isinstance(ckpt, dict) or not need <= set(ckpt):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"{path}: not a train.py checkpoint (needs keys {sorted(need)}, has {have})")
    return ckpt
