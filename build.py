"""Everything train.py, eval.py and the other scripts build from a config: the Config, the frozen VLM, the trainable
Grounder, the datasets and loaders, the torchrun setup and the checkpoint reader.

    cfg = load_config("configs/demo.yaml", ["batch_size=8"])
    qwen, tokenizer = build_qwen(cfg, device); grounder, kwargs = build_grounder(cfg, qwen)
"""
import contextlib
import dataclasses
import glob
import hashlib
import inspect
import json
import os
import re
import zipfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import transformers
import yaml

import batching
import data
import head as heads
import model
import qwen_inputs
import refiner
import selector as selection
import synthetic
import vlmbox

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
    # layers' hidden states form its text prompt (0 = all, as F-LMM); box: mask (the coarse mask's, F-LMM) or vlm (the
    # frozen VLM's own box, generated once per sentence: vlmbox.py); detach_mask: true stops the refined loss at the
    # dense prompt (the U-Net then trains on its own loss only; F-LMM: false)
    selector: dict = field(default_factory=dict)  # the learned phrase selector (chat.py); empty = off. layers: how
    # many last VLM layers' hidden states of the answer tokens it reads (0 = all); width: its channels (default 128)
    # data
    synthetic: dict = field(default_factory=dict)  # synthetic.make_synthetic kwargs; written once, then reused
    train_data: list = field(default_factory=list)  # batching.build_dataset specs, mixed by concatenation
    val_data: list = field(default_factory=list)  # specs scored by the periodic eval and at the end
    test_data: list = field(default_factory=list)  # specs eval.py scores (default: val_data)
    protocol: str = "standard"  # eval protocol: standard (every sentence) or flmm (first sentence, per image)
    layout: str = "image"  # training sequences: image (all objects of an image in one) or sentence (each object's
    # sentence independent of the others, as the standard eval protocol and cache.py lay them out)
    train_sentences: str = "one"  # per object and epoch: one sentence drawn from (seed, epoch, index), or all of them
    # (each its own phrase; layout=sentence): ~2.8x the phrases per epoch on RefCOCO behind the same packed forwards
    pack_tokens: int = 2048  # sentence layout, standard-protocol eval, cache.py: an image's sentences share one prefix
    # (one vision + prefix forward per image, each sentence exactly as alone), rows capped at this many tokens;
    # 0 = one sequence per sentence
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
    threads: int = 0  # torch CPU threads (0: torch's default); 1 is often fastest for tiny models on small CPUs.
    # OMP_NUM_THREADS in the environment wins (torchrun sets it to 1 per rank; set it yourself on a busy machine)
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


def _keywords(fn, *computed):
    return sorted(set(inspect.signature(fn).parameters) - set(computed))


# The keys each nested block takes: the keyword arguments of what it configures, less those computed from the VLM.
NESTED = dict(head=_keywords(heads.MaskHead.__init__, "self", "in_channels", "vision_channels", "token_px"),
              tiny_model=_keywords(synthetic.build_tiny_qwen, "out_dir", "texts"),
              synthetic=_keywords(synthetic.make_synthetic), refiner=["sam", "text_layers", "box", "detach_mask"], selector=["layers", "width"])


def config_from_dict(raw, where="config"):
    """dict -> Config. Unknown keys (also inside the nested blocks, NESTED) and values of the wrong type are errors;
    1e-4 (a string to PyYAML) is coerced; an empty value of a string (`cache_dir=`) is the empty string."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise SystemExit(f"{where}: unknown config keys {unknown}; known: {sorted(fields)}")
    defaults, out = Config(), {}
    for key, value in raw.items():
        kind = type(getattr(defaults, key))
        if kind is str and value is None:  # `cache_dir=` on the command line, `cache_dir:` in YAML
            value = ""
        if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                value = float(value)
            except ValueError:
                pass
        if kind is tuple and isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            raise SystemExit(f"{where}: {key} must be {kind.__name__}, got {value!r}")
        if key in NESTED and set(value) - set(NESTED[key]):
            raise SystemExit(f"{where}: {key} takes the keys {NESTED[key]}; unknown: {sorted(set(value) - set(NESTED[key]))}")
        out[key] = value
    cfg = Config(**out)
    if cfg.refiner and "sam" not in cfg.refiner:
        raise SystemExit(f"{where}: refiner needs sam (a Hub id, a local dir, tiny or synthetic), got {cfg.refiner}")
    if cfg.dtype not in DTYPES:
        raise SystemExit(f"{where}: dtype must be one of {DTYPES}, got {cfg.dtype!r}")
    if cfg.layout not in ("image", "sentence"):
        raise SystemExit(f"{where}: layout must be image or sentence, got {cfg.layout!r}")
    if cfg.train_sentences not in ("one", "all") or (cfg.train_sentences == "all" and cfg.layout != "sentence"):
        raise SystemExit(f"{where}: train_sentences must be one, or all with layout=sentence (in one sequence an "
                         f"object's sentences would see each other); got {cfg.train_sentences!r} with layout="
                         f"{cfg.layout}")
    if cfg.protocol not in ("standard", "flmm"):
        raise SystemExit(f"{where}: protocol must be standard or flmm, got {cfg.protocol!r}")
    for key in ("batch_size", "grad_accum"):
        if getattr(cfg, key) < 1:
            raise SystemExit(f"{where}: {key} must be >= 1, got {getattr(cfg, key)}")
    return cfg


def load_config(path=None, overrides=()):
    """YAML file + key=value overrides (values parsed as YAML, booleans only as true/false) -> Config. The file is
    checked alone first, so that an error the overrides bring is blamed on the command line."""
    raw = {}
    if path:
        with open(path) as f:
            raw = _yaml(f) or {}
        config_from_dict(raw, path)
    over = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r} is not key=value")
        try:
            over[key] = _yaml(value)
        except yaml.YAMLError as e:  # e.g. head={base: 8 (the shell split an unquoted value at its space)
            raise SystemExit(f"command line: {item!r} is not a YAML value ({e.problem}); quote it: '{key}={{...}}'")
    return config_from_dict({**raw, **over}, f"command line {list(overrides)}" if over else path or "defaults")


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
    if cfg.threads and "OMP_NUM_THREADS" not in os.environ:  # the launcher's (or the user's) choice wins
        torch.set_num_threads(cfg.threads)
    if cfg.synthetic:
        if rank == 0:
            synthetic.make_synthetic(**cfg.synthetic)
        if world > 1:
            dist.barrier()
    prepare_sam(cfg)
    return rank, world, device


def print_config(cfg):
    """The resolved config as YAML on rank 0: the first thing a job prints (train.py, cache.py)."""
    print0(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")


@contextlib.contextmanager
def one_line_data_errors():
    """A strict data error (data.DataError: the file and sample are in its message) ends the job in one line, not a
    traceback; from a DataLoader worker the message carries the worker's traceback, whose last line is the error."""
    try:
        yield
    except data.DataError as e:
        last = [line for line in str(e).splitlines() if line.strip()][-1]
        raise SystemExit(f"data error: {last.split('DataError: ', 1)[-1]} (skip_bad=true skips and counts such samples)")


def autocast_for(cfg, device):
    """bf16 (or fp16) autocast on CUDA; float32 and the CPU run without."""
    if device.type == "cuda" and cfg.dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, cfg.dtype))
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------- models

def qwen_path(cfg):
    """Where the frozen VLM loads from: cfg.model, or for "tiny" the demo model's directory, written once (seeded)."""
    path = cfg.model
    if path == "tiny":  # one directory per build_tiny_qwen kwargs: another tiny_model never reuses a stale one
        tag = hashlib.sha1(json.dumps(cfg.tiny_model, sort_keys=True).encode()).hexdigest()[:8]
        path = os.path.join(cfg.synthetic.get("root", "data/synthetic"), f"tiny_qwen-{tag}")
        written = all(os.path.exists(os.path.join(path, f)) for f in ("config.json", "preprocessor_config.json"))
        if not written and int(os.environ.get("RANK", 0)) == 0:  # (older builds wrote no preprocessor_config.json)
            synthetic.build_tiny_qwen(path, synthetic.synthetic_texts(), **cfg.tiny_model)
        if dist.is_initialized():
            dist.barrier()
    elif not os.path.isdir(path) and (os.path.isabs(path) or path.startswith(".") or path.count("/") != 1):
        raise SystemExit(f"model={path}: no such directory (and not a Hub id, which is owner/name)")
    return path


def build_qwen(cfg, device):
    """The frozen VLM and its tokenizer (from qwen_path)."""
    dtype = getattr(torch, cfg.dtype) if device.type == "cuda" else torch.float32
    path = qwen_path(cfg)
    try:
        return model.load_qwen(path, dtype=dtype, device=device, shard=cfg.shard)
    except OSError as e:  # a Hub id that does not exist or cannot be fetched (offline)
        raise SystemExit(f"model={path}: cannot load it ({str(e).splitlines()[0]})")


def vlm_signature(config):
    """What a trained head depends on in its frozen VLM, from the VLM's config (`qwen.config` or AutoConfig): family,
    text and vision shapes. Two checkpoints of one architecture (a local copy of a Hub model) give the same."""
    text, vision = config.text_config, config.vision_config
    return dict(model_type=config.model_type, layers=text.num_hidden_layers, heads=text.num_attention_heads,
                kv_heads=text.num_key_value_heads, hidden=text.hidden_size, vocab=text.vocab_size,
                vision_depth=vision.depth, vision_hidden=vision.hidden_size,
                patch=vision.patch_size, merge=vision.spatial_merge_size)


def image_settings(cfg, tokenizer=None):
    """The patchify keyword arguments: the checkpoint's (load_qwen puts them on the tokenizer; without one they are
    read from qwen_path's preprocessor_config.json), with the config's min_pixels / max_pixels where they are set."""
    base = tokenizer.image_settings if tokenizer is not None else qwen_inputs.image_settings(qwen_path(cfg))
    overrides = {k: getattr(cfg, k) for k in ("min_pixels", "max_pixels") if getattr(cfg, k)}
    return {**base, **overrides}


TINY_SAMS = {"tiny": "sam", **{f"tiny_{family}": family for family in refiner.FAMILIES}}  # random, for CPU runs


def sam_path(cfg):
    """The SAM checkpoint cfg.refiner names: its `sam`, or for "tiny", "tiny_<family>" and "synthetic" the demo's
    folder under the synthetic root (prepare_sam writes it)."""
    sam = cfg.refiner["sam"]
    written = sam in TINY_SAMS or sam == "synthetic"
    return os.path.join(cfg.synthetic.get("root", "data/synthetic"), f"{sam}_sam") if written else sam


def prepare_sam(cfg):
    """Write the demo's SAM once when the config names one (refiner.sam tiny: random; synthetic: trained on the
    synthetic masks, ~1 min), on rank 0 while the others wait. start_job calls it; a Hub id or a folder is left alone."""
    if not cfg.refiner or (cfg.refiner["sam"] not in TINY_SAMS and cfg.refiner["sam"] != "synthetic"):
        return
    path = sam_path(cfg)
    if not os.path.exists(os.path.join(path, "config.json")) and int(os.environ.get("RANK", 0)) == 0:
        if cfg.refiner["sam"] in TINY_SAMS:
            refiner.build_tiny_sam(path, family=TINY_SAMS[cfg.refiner["sam"]])
        else:
            root = cfg.synthetic.get("root", "data/synthetic")
            print(f"training the demo's tiny SAM on {root}'s training masks from box prompts (once) -> {path}")
            synthetic.build_synthetic_sam(path, root)
    if dist.is_initialized():
        dist.barrier()


REFINER_DEFAULTS = dict(box="mask", detach_mask=False)  # F-LMM's: the coarse mask's box, the mask prompt not detached


def check_refiner(cfg):
    """cfg.refiner: sam (required), text_layers, box (mask | vlm), detach_mask (bool); anything else is an error."""
    r = cfg.refiner
    unknown = sorted(set(r) - {"sam", "text_layers", *REFINER_DEFAULTS})
    if unknown or "sam" not in r or r.get("box", "mask") not in ("mask", "vlm") \
            or not isinstance(r.get("detach_mask", False), bool):
        raise SystemExit(f"refiner: needs sam (a Hub id, a local dir, tiny or synthetic), optionally text_layers, box "
                         f"(mask: the coarse mask's box, F-LMM; vlm: the frozen VLM's own box) and detach_mask "
                         f"(true|false); got {r}")


def sam_sha1(name_or_path):
    """sha1 (16 hex digits) of a SAM checkpoint's weight files (*.safetensors, else *.bin), in name order: what a
    cache of its image embeddings depends on (cache.frozen_meta), whatever the checkpoint is called. A Hub id is
    resolved to its downloaded snapshot (downloading it if needed, as load_sam would)."""
    folder = name_or_path
    if not os.path.isdir(folder):
        from huggingface_hub import snapshot_download
        folder = snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.bin"])
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors"))) or sorted(glob.glob(os.path.join(folder, "*.bin")))
    if not files:
        raise FileNotFoundError(f"SAM checkpoint {name_or_path!r}: no *.safetensors or *.bin weight file in {folder}")
    h = hashlib.sha1()
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


def grounder_kwargs(cfg, config):
    """The constructor arguments of the trainable modules for this VLM's config (`qwen.config`, or a cache's
    `cache.model_config`; saved in the checkpoint)."""
    text, vision = config.text_config, config.vision_config
    head = dict(in_channels=text.num_hidden_layers * text.num_attention_heads,
                vision_channels=model.vision_channels(config) if cfg.vision_features else 0,
                token_px=vision.patch_size * vision.spatial_merge_size, **cfg.head)
    refine = None
    if cfg.refiner:
        check_refiner(cfg)
        layers = cfg.refiner.get("text_layers", 0) or text.num_hidden_layers
        if not 0 < layers <= text.num_hidden_layers:
            raise SystemExit(f"refiner.text_layers must be in 1..{text.num_hidden_layers} (0 = all), got {layers}")
        refine = dict(sam=sam_path(cfg), hidden_size=text.hidden_size, text_layers=layers)
        # box / detach_mask only when not F-LMM's defaults: older checkpoints' kwargs stay equal (resume compares them)
        refine.update({k: cfg.refiner[k] for k, default in REFINER_DEFAULTS.items()
                       if cfg.refiner.get(k, default) != default})
    kwargs = dict(head=head, refiner=refine)
    if cfg.selector:  # the key only with a selector: older checkpoints' kwargs stay equal (resume compares them)
        layers = cfg.selector.get("layers", 0) or text.num_hidden_layers
        if not 0 < layers <= text.num_hidden_layers:
            raise SystemExit(f"selector: takes layers (1..{text.num_hidden_layers}, 0 = all) and width; got "
                             f"{cfg.selector}")
        kwargs["selector"] = dict(hidden_size=text.hidden_size, layers=layers, width=cfg.selector.get("width", 128))
    return kwargs


def build_grounder(kwargs, device="cpu", encoder=True):
    """Grounder from grounder_kwargs (or a checkpoint's copy of them): the MaskHead, and the Refiner around the SAM
    named there (its frozen image encoder loaded from that checkpoint, never saved with ours). encoder=False: the
    Refiner without SAM's image encoder (training from a cache, whose image embeddings are already extracted)."""
    refine = None
    if kwargs["refiner"]:
        r = kwargs["refiner"]
        refine = refiner.Refiner(refiner.load_sam(r["sam"], device=device), hidden_size=r["hidden_size"],
                                 text_layers=r["text_layers"], encoder=encoder,
                                 **{k: r[k] for k in REFINER_DEFAULTS if k in r})
    select = selection.Selector(**kwargs["selector"]) if kwargs.get("selector") else None
    return heads.Grounder(heads.MaskHead(**kwargs["head"]), refine, select).to(device)


def sam_settings(grounder):
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
    if select is not None:  # the selector's targets need each answer's mask_ids: a cache keeps them (no input_ids)
        frozen["answer_mask_ids"] = [m for _, _, m in heads.answer_mask_ids(batch)]  # per sentence
    if refine is not None:  # SAM's image encoder once per distinct image (the sentence layout repeats images)
        row = {}  # image_id -> its row among the distinct images, in first-seen order
        for image_id in batch["image_id"]:
            row.setdefault(image_id, len(row))
        first = {image_id: i for i, image_id in reversed(list(enumerate(batch["image_id"])))}
        image = refine.image_embeddings(torch.stack([batch["sam_pixel_values"][first[i]] for i in row]))
        index = torch.tensor([row[image_id] for image_id in batch["image_id"]], device=image["sam_embeddings"].device)
        frozen.update({k: v[index] for k, v in image.items()}, sam_sizes=batch["sam_size"])
        if refine.box == "vlm":  # the VLM's own box for each phrase, generated once (then cached with the rest)
            frozen["vlm_box"] = vlmbox.vlm_boxes(qwen, batch)
    return frozen



def base_vlm(cfg):
    """The frozen VLM a run reads, as export.py records it: its name (+ tiny_model for the demo's) and vlm_signature,
    from its config.json alone (no weights load)."""
    config = transformers.AutoConfig.from_pretrained(qwen_path(cfg))
    return dict(name=cfg.model, **({"tiny_model": cfg.tiny_model} if cfg.model == "tiny" else {}), **vlm_signature(config))


def check_base_vlm(recorded, given, where):
    """Refuse a VLM other than the one the head was trained on (base_vlm dicts), naming both."""
    differ = {k: (recorded.get(k), v) for k, v in given.items() if k not in ("name", "tiny_model") and recorded.get(k) != v}
    if differ:
        raise SystemExit(f"{where} was trained on the VLM {recorded['name']!r}, not on {given['name']!r}: they differ "
                         f"in {', '.join(f'{k} ({a!r} vs {b!r})' for k, (a, b) in differ.items())}; its head reads "
                         f"that VLM's attention maps")

# --------------------------------------------------------------------------------------------------- data

def check_data(cfg, specs):
    """Before any model loads: every file and folder the data specs name exists (one message listing the missing)."""
    missing = [f"{data.spec_name(s)}: {p}" for s in specs for p in data.spec_files(s) if not os.path.exists(p)]
    if missing:
        raise SystemExit("data not found (paths are relative to where you run the script):\n  " + "\n  ".join(missing))


def build_dataset(cfg, tokenizer, spec, train, sam_settings=None, settings=None):
    """settings: patchify's keyword arguments (None: image_settings(cfg, tokenizer)); cache.py passes those its files
    were extracted with, and no tokenizer."""
    settings = image_settings(cfg, tokenizer) if settings is None else settings
    return batching.build_dataset(spec, tokenizer, train=train, protocol=cfg.protocol, image_settings=settings,
                              skip_bad=cfg.skip_bad,
                              max_length=cfg.max_length,
                              seed=cfg.seed, constant_phrase=cfg.constant_phrase or None, layout=cfg.layout,
                              pack_tokens=cfg.pack_tokens, sam_settings=sam_settings,
                              every_sentence=cfg.train_sentences == "all")


def build_train_loader(cfg, tokenizer, sam_settings=None):
    sets = [build_dataset(cfg, tokenizer, spec, train=True, sam_settings=sam_settings) for spec in cfg.train_data]
    train_set = sets[0] if len(sets) == 1 else torch.utils.data.ConcatDataset(sets)
    return batching.build_loader(train_set, cfg.batch_size, num_workers=cfg.num_workers, shuffle=True, seed=cfg.seed,
                             drop_last=True)


def build_val_loaders(cfg, tokenizer, specs, sam_settings=None):
    """{split name: (loader, spec)} for eval, in the config's order."""
    return {data.spec_name(spec): (batching.build_loader(build_dataset(cfg, tokenizer, spec, train=False, sam_settings=sam_settings),
                                                     cfg.batch_size, num_workers=cfg.num_workers), spec)
            for spec in specs}


# ------------------------------------------------------------------------------------------------ checkpoint

EXPORT_FORMAT = "qwen-flmm-grounder"  # config.json's "format" in an export.py directory
EXPORT_KEYS = ("config", "grounder_kwargs", "step", "base_vlm")  # what load_checkpoint reads from that config.json


def load_checkpoint(path):
    """A train.py checkpoint, an export.py directory or a Hub id holding one -> the checkpoint's dict (an export: the
    same keys minus optimizer / RNG state, plus base_vlm); one clear line (SystemExit) for anything else there."""
    if os.path.isdir(path):
        return load_export(path)
    if not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path):  # owner/name: an export on the Hub
        from huggingface_hub import snapshot_download
        try:
            folder = snapshot_download(path)
        except Exception as e:  # offline, no such repo, no access: the Hub's own words
            raise SystemExit(f"{path}: no such file or directory, and not downloadable as a Hub repo "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        return load_export(folder)
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such checkpoint")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"  # a zip's first entry, but no directory at the end
        raise SystemExit(f"{path}: " + ("truncated: a torch zip file without its end (an interrupted copy or write?)"
                                        if zip_start else "not a train.py checkpoint (not a torch zip file; is it a "
                                                          "config or an image?)"))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError) as e:  # truncated or from another program
        raise SystemExit(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    need = {"config", "grounder", "grounder_kwargs", "step"}
    if not isinstance(ckpt, dict) or not need <= set(ckpt):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"{path}: not a train.py checkpoint (needs keys {sorted(need)}, has {have})")
    return ckpt


def load_export(folder):
    """An export.py directory (model.safetensors + config.json) -> dict(config, grounder, grounder_kwargs, step,
    base_vlm) as load_checkpoint gives it."""
    paths = {name: os.path.join(folder, name) for name in ("config.json", "model.safetensors")}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        hint = " (a train.py run's out_dir: give its ckpt.pt)" if os.path.isfile(os.path.join(folder, "ckpt.pt")) else ""
        raise SystemExit(f"{folder}: not an export.py directory, missing {missing}{hint}")
    with open(paths["config.json"]) as f:
        meta = json.load(f)
    if meta.get("format") != EXPORT_FORMAT or not set(EXPORT_KEYS) <= set(meta):
        raise SystemExit(f"{paths['config.json']}: not an export.py config (needs format {EXPORT_FORMAT!r} and keys "
                         f"{list(EXPORT_KEYS)}, has format {meta.get('format')!r} and keys {sorted(meta)})")
    from safetensors.torch import load_file
    return dict({k: meta[k] for k in EXPORT_KEYS}, grounder=load_file(paths["model.safetensors"]))


def load_run(ckpt_path, device, model=None, cached=False):
    """Checkpoint (a ckpt.pt, an export.py directory or a Hub id holding one) -> (qwen, grounder, tokenizer, Config):
    the VLM named in the saved config (or `model`, a local copy of it: another VLM is refused, naming both), the
    trained modules from the checkpoint. cached: no VLM (qwen and tokenizer None), the frozen outputs come from the
    run's cache_dir."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = config_from_dict(ckpt["config"], ckpt_path)
    if model is not None or "base_vlm" in ckpt:  # checked from config.json files before any weights load
        given = base_vlm(dataclasses.replace(cfg, model=model or cfg.model))
        check_base_vlm(ckpt.get("base_vlm") or base_vlm(cfg), given, ckpt_path)
        cfg.model = given["name"]
    qwen, tokenizer = (None, None) if cached else build_qwen(cfg, device)
    grounder = heads.load_state(build_grounder(ckpt["grounder_kwargs"], device), ckpt["grounder"], ckpt_path)
    return qwen, grounder.eval(), tokenizer, cfg
