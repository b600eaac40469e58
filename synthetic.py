"""A synthetic referring dataset in the refer layout, so the demo and the tests run the real data path with nothing
downloaded: scenes of 3-5 coloured shapes, every expression naming exactly one object ("the red circle", "the big
red star on the left") while most distractors share its colour or its shape (only the language decides), exact
masks, train/val/testA/testB, deterministic from a seed.

    make_synthetic(root) -> root/synthetic/{refs(unc).p, instances.json, meta.json}, root/images/*.png
    data.load_refer(root, "synthetic", "unc", "val") reads it like RefCOCO.
    build_tiny_qwen(out_dir, synthetic_texts()) -> a random tiny Qwen2.5-VL checkpoint that model.load_qwen loads.
"""
import json
import os
import pickle
import shutil
import tempfile
from itertools import combinations, product

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from data import decode_mask

SHAPES = ("circle", "square", "triangle", "star", "hexagon")
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 220), "yellow": (230, 190, 20),
           "purple": (140, 60, 170)}
SIZES = ("small", "big")
WORD_ATTRIBUTE = {**{w: "shape" for w in SHAPES}, **{w: "colour" for w in COLOURS}, **{w: "size" for w in SIZES},
                  "left": "h", "right": "h", "top": "v", "bottom": "v"}
SYNTHETIC_SPLITS = {"train": (3, 5), "val": (3, 5), "testA": (3, 3), "testB": (5, 5)}  # objects per scene
SYNTHETIC_VERSION = 2  # bump when the generator changes: cached datasets are then rebuilt


def describe(obj, attrs):
    """An object's phrase naming the attributes `attrs` (the shape is always named): 'big red circle on the left'."""
    words = [obj[a] for a in ("size", "colour") if a in attrs and obj[a]] + [obj["shape"]]
    h, v = (obj[a] if a in attrs else None for a in ("h", "v"))
    where = f"in the {v} {h}" if h and v else f"on the {h}" if h else f"at the {v}" if v else ""
    return " ".join(words + [where] if where else words)


def synthetic_matches(sentence, objects):
    """How many scene objects (attribute dicts) have every attribute the sentence names: 1 when unambiguous."""
    named = {WORD_ATTRIBUTE[w]: w for w in sentence.split() if w in WORD_ATTRIBUTE}
    return sum(all(o[a] == w for a, w in named.items()) for o in objects)


def synthetic_texts():
    """Every phrase the synthetic data can contain (for training a tiny tokenizer)."""
    return [the + describe(dict(shape=s, colour=c, size=z, h=h, v=v), ("colour", "size", "h", "v"))
            for s, c, z, h, v in product(SHAPES, (None, *COLOURS), (None, *SIZES), (None, "left", "right"),
                                         (None, "top", "bottom")) for the in ("", "the ")]


def _polygon(shape, cx, cy, r):
    """COCO polygon [x0, y0, x1, y1, ...] of a shape of radius r, pointing up."""
    n, outer, inner = {"circle": (32, 1.0, 1.0), "square": (4, 1.0, 1.0), "triangle": (3, 1.15, 1.15),
                       "star": (10, 1.1, 0.5), "hexagon": (6, 1.0, 1.0)}[shape]  # star: alternating radii
    t = (np.pi / 4 if shape == "square" else -np.pi / 2) + 2 * np.pi * np.arange(n) / n
    rr = r * np.where(np.arange(n) % 2, inner, outer)
    return np.round(np.stack([cx + rr * np.cos(t), cy + rr * np.sin(t)], 1).reshape(-1), 2).tolist()


def _scene(rng, n, width, height):
    """n objects in distinct cells of a 3x3 grid, each referred object >= 75% visible; later objects are on top.
    Most objects share the shape or the colour of an earlier one, so a description needs several attributes."""
    while True:
        objs = []
        for cell in rng.choice(9, n, replace=False):
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            if objs and rng.random() < 0.8:
                other = objs[rng.integers(len(objs))]
                shape, colour = (other["shape"], colour) if rng.random() < 0.5 else (shape, other["colour"])
            big = rng.random() < 0.5
            row, col = divmod(int(cell), 3)
            wh = np.array([width, height])
            cx, cy = (wh * (0.2 + 0.3 * np.array([col, row])) + rng.uniform(-6, 6, 2) * wh / 224).tolist()
            r = min(width, height) * (rng.uniform(0.12, 0.14) if big else rng.uniform(0.065, 0.085))
            objs.append(dict(shape=str(shape), colour=str(colour), size=SIZES[big], h={0: "left", 2: "right"}.get(col),
                             v={0: "top", 2: "bottom"}.get(row), polygon=_polygon(shape, cx, cy, r)))
        full = np.stack([decode_mask([o["polygon"]], height, width) for o in objs])
        above = np.flip(np.logical_or.accumulate(np.flip(full, 0), 0), 0)  # above[i] = union of full[i:]
        visible = full & ~np.concatenate([above[1:], np.zeros_like(full[:1])])
        if (visible.sum((1, 2)) >= 0.75 * full.sum((1, 2))).all():
            return objs, full, visible


def _expressions(rng, obj, scene):
    """2-3 phrasings of the shortest description naming `obj` alone in `scene` (attribute dicts); [] if none does.
    Colour and shape are always named, as people name them; size and position only where they are needed."""
    options = [k for k in ("size", "h", "v") if obj[k]]
    for n in range(len(options) + 1):  # shortest first, in a random order within a length
        combos = [("colour",) + c for c in combinations(options, n)]
        unique = [combos[i] for i in rng.permutation(len(combos))
                  if synthetic_matches(describe(obj, combos[i]), scene) == 1]
        if unique:
            d, extra = describe(obj, unique[0]), [k for k in options if k not in unique[0]]
            longer = ["the " + describe(obj, unique[0] + (extra[int(rng.integers(len(extra)))],))] if extra else []
            return [d, "the " + d] + longer  # the longer one is still true, so still unique
    return []  # an identical twin in the scene


def _write_synthetic(out, seed, counts, width, height):
    os.makedirs(os.path.join(out, "synthetic"))
    os.makedirs(os.path.join(out, "images"))
    refs, images, anns, n_sent = [], [], [], 0
    for s, (split, (lo, hi)) in enumerate(SYNTHETIC_SPLITS.items()):
        rng = np.random.default_rng([seed, s])  # one stream per split: val does not change with num_train
        for _ in range(counts[split]):
            objs, full, visible = _scene(rng, int(rng.integers(lo, hi + 1)), width, height)
            image_id = len(images) + 1
            file_name = f"synthetic_{image_id:012d}.png"
            pixels = np.full((height, width, 3), 235, np.uint8)
            for o, m in zip(objs, full):  # painted from the decoded masks: image and masks agree to the pixel
                pixels[m] = COLOURS[o["colour"]]
            Image.fromarray(pixels).save(os.path.join(out, "images", file_name), compress_level=1)  # fast, same pixels
            images.append(dict(id=image_id, file_name=file_name, height=height, width=width))
            scene = [{k: o[k] for k in ("shape", "colour", "size", "h", "v")} for o in objs]
            for o, a, f, m in zip(objs, scene, full, visible):
                ann_id, rle = len(anns) + 1, mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                # the polygon when nothing covers the object, else the visible part as an RLE
                seg = [o["polygon"]] if (f == m).all() else dict(size=[height, width], counts=rle["counts"].decode())
                anns.append(dict(id=ann_id, image_id=image_id, category_id=SHAPES.index(o["shape"]) + 1, iscrowd=0,
                                 segmentation=seg, area=int(mask_utils.area(rle)),
                                 bbox=mask_utils.toBbox(rle).tolist(), attributes=a))
                sents = [dict(sent=t, raw=t, tokens=t.split(), sent_id=n_sent + i)
                         for i, t in enumerate(_expressions(rng, a, scene))]
                n_sent += len(sents)
                if sents:
                    refs.append(dict(ref_id=len(refs), ann_id=ann_id, image_id=image_id, split=split,
                                     category_id=SHAPES.index(o["shape"]) + 1, sentences=sents,
                                     sent_ids=[x["sent_id"] for x in sents],
                                     file_name=f"synthetic_{image_id:012d}_{ann_id}.png"))  # like refer's: no file
    with open(os.path.join(out, "synthetic", "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f)
    with open(os.path.join(out, "synthetic", "instances.json"), "w") as f:
        json.dump(dict(images=images, annotations=anns,
                       categories=[dict(id=i + 1, name=s) for i, s in enumerate(SHAPES)]), f)


def make_synthetic(root, seed=0, num_train=400, num_val=50, num_test=50, size=224, narratives=False):
    """Write (once) a synthetic RefCOCO in the refer layout: root/synthetic/{refs(unc).p, instances.json,
    meta.json}, root/images/*.png; splits train/val/testA (3 objects)/testB (5 objects), num_test scenes each;
    size is the side of square images or (width, height).
    Deterministic from the arguments; a finished dataset with the same meta.json is kept. Call it on one rank.
    narratives=True also writes make_narratives(root, seed) (PNG format, root/narratives/) from the train/val scenes."""
    counts = dict(train=num_train, val=num_val, testA=num_test, testB=num_test)
    meta = dict(version=SYNTHETIC_VERSION, seed=seed, size=size if isinstance(size, int) else list(size), **counts)
    meta_path = os.path.join(root, "synthetic", "meta.json")
    if os.path.isfile(meta_path) and os.path.isdir(os.path.join(root, "images")) and _load_meta(meta_path) == meta:
        if narratives:
            make_narratives(root, seed)
        return root
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-synthetic-")
    width, height = (size, size) if isinstance(size, int) else size
    _write_synthetic(tmp, seed, counts, width, height)
    with open(os.path.join(tmp, "synthetic", "meta.json"), "w") as f:
        json.dump(meta, f)
    for name in ("synthetic", "images"):  # a stale dataset goes, its meta.json first
        if os.path.exists(os.path.join(root, name)):
            shutil.rmtree(os.path.join(root, name))
    for name in ("images", "synthetic"):  # meta.json arrives last: a run killed in between redoes everything
        os.rename(os.path.join(tmp, name), os.path.join(root, name))
    os.rmdir(tmp)
    if narratives:
        make_narratives(root, seed)
    return root


def _load_meta(path):
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------- the tiny SAM

def build_synthetic_sam(out_dir, root, *, seed=0, steps=400, images_per_step=8, lr=3e-3):
    """Write the demo's SAM: refiner's tiny SAM, trained (all of it, seeded) to segment the synthetic training
    objects from jittered box prompts, so that, like a real SAM, it knows this world's edges. A random tiny SAM knows
    none; a few hundred CPU steps reach IoU ~0.85 from boxes. Loads with `refiner.load_sam(out_dir)`."""
    import torch.nn.functional as F
    from data import load_refer, resize_masks, union_mask
    from refiner import build_tiny_sam, load_sam, sam_image
    by_image = {}
    for r in load_refer(root, "synthetic", "unc", "train"):
        by_image.setdefault(r["image_id"], []).append(r)
    images = list(by_image.values())
    build_tiny_sam(out_dir, seed)
    sam = load_sam(out_dir, device="cpu").train()
    size = sam.config.vision_config.image_size
    rng, per_image = np.random.default_rng(seed), 3  # boxes per image: SamModel takes (B, boxes, 4)
    opt = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    for step in range(steps):
        pixels, boxes, targets = [], [], []
        for i in rng.choice(len(images), images_per_step, replace=False):
            refs = [images[i][k % len(images[i])] for k in range(per_image)]
            with Image.open(os.path.join(root, "images", refs[0]["file_name"])) as image:
                sam_input = sam_image(image, size)
            rh, rw = sam_input["sam_size"]
            pixels.append(sam_input["sam_pixel_values"])
            for r in refs:
                target = resize_masks(union_mask(r["segmentations"], r["height"], r["width"])[None], rh, rw)[0]
                ys, xs = np.nonzero(target.numpy())
                box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
                box += rng.normal(0, 0.1, 4).astype(np.float32) * np.tile(box[2:] - box[:2], 2)  # a loose box
                boxes.append(box)
                targets.append(target)
        low_res = sam(pixel_values=torch.stack(pixels), input_boxes=torch.from_numpy(np.stack(boxes)).view(
            images_per_step, per_image, 4), multimask_output=False).pred_masks  # (B, boxes, 1, m, m)
        x = F.interpolate(low_res.flatten(0, 2)[:, None], size=(size, size), mode="bilinear", align_corners=False)
        x = x[:, 0, :rh, :rw].flatten(1)  # (B*boxes, rh*rw): every synthetic image has the same frame
        m = torch.stack(targets).flatten(1).float()
        p = x.sigmoid()
        loss = F.binary_cross_entropy_with_logits(x, m) + (1 - (2 * (p * m).sum(1) + 1) / (p.sum(1) + m.sum(1) + 1)).mean()
        for group in opt.param_groups:  # cosine to 0
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sam.save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------- the tiny VLM

# Qwen's special tokens, in Qwen's order (151643 ...); the tiny tokenizer appends them after its BPE vocab.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_PRETOKENIZE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
TINY_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")  # model_type of each family's checkpoint
# The image processor settings each family's Hub checkpoints write to preprocessor_config.json (Qwen2/2.5-VL as
# min_pixels/max_pixels, Qwen3-VL as size), so that qwen_inputs.image_settings reads a tiny checkpoint like a real one.
QWEN2_PREPROCESSOR = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
                          image_mean=[0.48145466, 0.4578275, 0.40821073],
                          image_std=[0.26862954, 0.26130258, 0.27577711], image_processor_type="Qwen2VLImageProcessor")
QWEN3_PREPROCESSOR = dict(size={"longest_edge": 16777216, "shortest_edge": 65536}, patch_size=16, temporal_patch_size=2,
                          merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                          image_processor_type="Qwen2VLImageProcessorFast")


def build_tiny_qwen(out_dir, texts, *, family="qwen2_5_vl", seed=0, hidden=128, layers=4, heads=4, kv_heads=2,
                    vision_hidden=64, vision_depth=2, vocab_size=512, init_std=0.02, experts=4, experts_per_token=2,
                    tied=False):
    """Write a random tiny VLM of `family` (one of TINY_FAMILIES), its preprocessor_config.json and a BPE tokenizer
    trained on `texts` to `out_dir` (offline, seeded).

    The result loads with `load_qwen(out_dir)` like a real checkpoint: same classes, same chat layout, same special
    tokens (at other ids), the family's image settings (Qwen3-VL: 16-px patches, mean/std 0.5). head_dim = hidden //
    heads. Qwen2/2.5-VL: mrope_section splits head_dim/2 as 1:1.5:1.5, vision `vision_depth` blocks (Qwen2.5-VL:
    112-px windows, the last block full). Qwen3-VL: interleaved M-RoPE, q/k norms, DeepStack from the first vision
    blocks into the first decoder layers; qwen3_vl_moe: `experts` experts, `experts_per_token` active, in every layer.
    tied: lm_head shares the input embeddings (as in Qwen2.5-VL-3B and Qwen3-VL-2B/4B).
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration)
    if family not in TINY_FAMILIES:
        raise ValueError(f"build_tiny_qwen: family must be one of {TINY_FAMILIES}, got {family!r}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model_json = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model_json["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden // heads
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=tied)
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                initializer_range=init_std)
    vision_heads = max(1, vision_hidden // 32)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]
        section[0] += head_dim // 2 - sum(section)
        text["rope_parameters"] = dict(rope_type="default", rope_theta=1e6, mrope_section=section)
    else:  # Qwen3-VL's proportions (24:20:20 of 64), interleaved over the frequencies
        h = head_dim * 5 // 32
        text.update(head_dim=head_dim, rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_interleaved=True,
                                                            mrope_section=[head_dim // 2 - 2 * h, h, h]))
    if family == "qwen2_5_vl":  # unchanged from the first tiny model: the demo's numbers depend on these weights
        cfg = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                               num_heads=vision_heads, out_hidden_size=hidden, window_size=112,
                               fullatt_block_indexes=[vision_depth - 1], initializer_range=init_std), **tokens)
        model_class = Qwen2_5_VLForConditionalGeneration
    elif family == "qwen2_vl":  # Qwen2-VL's vision config calls its width embed_dim and its output hidden_size
        cfg = Qwen2VLConfig(text_config=text, vision_config=dict(
            depth=vision_depth, embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2, num_heads=vision_heads,
            initializer_range=init_std), **tokens)
        model_class = Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                      num_heads=vision_heads, out_hidden_size=hidden, num_position_embeddings=256,  # a 16x16 table
                      deepstack_visual_indexes=list(range(max(1, vision_depth - 1)))[:min(3, layers)],
                      initializer_range=init_std)
        if family == "qwen3_vl":
            cfg = Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
            model_class = Qwen3VLForConditionalGeneration
        else:
            text.update(num_experts=experts, num_experts_per_tok=experts_per_token, moe_intermediate_size=hidden,
                        decoder_sparse_step=1, tie_word_embeddings=tied)  # (read into the outer config)
            cfg = Qwen3VLMoeConfig(text_config=text, vision_config=vision, **tokens)
            model_class = Qwen3VLMoeForConditionalGeneration
    torch.manual_seed(seed)
    qwen = model_class(cfg)
    os.makedirs(out_dir, exist_ok=True)
    qwen.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(QWEN3_PREPROCESSOR if family.startswith("qwen3") else QWEN2_PREPROCESSOR, f, indent=2)
    return out_dir


# ------------------------------------------------------------------------------------- synthetic narratives

# Filler between the expressions of a narrative. Many name colours and shapes that are not a referred object, so that
# marking every colour or shape word (keyword_spans, the demo's baseline) is not the answer.
FILLERS = ("In this picture I can see", "and", "and also", ", next to it there is", ". Nearby is",
           ". I think red and blue look nice together, and there is", ". Not a circle but", ", which is drawn beside",
           ". The background is grey, not green or yellow, and we see", ". Shapes like a star or a square are common;",
           ". Somewhere else I notice")
OPENINGS = ("In this picture I can see", "Here we have", "There is", "Look at")
ENDINGS = (".", ". That is all.", ", all on a light grey background.", ". No purple triangle is hidden here.")


def make_narratives(root, seed=0, splits=("train", "val")):
    """Write (once) synthetic narratives in the Panoptic Narrative Grounding format from the synthetic referring data
    in `root` (make_synthetic first): per split, one narrative per image that strings 2-3 of its expressions together
    with filler text (FILLERS) -> root/narratives/png_{split}.json (segments: utterance, segment_ids, plural; filler
    utterances have none), panoptic_{split}.json (segments_info, categories) and panoptic_{split}/*.png (id = R + 256 G
    + 256^2 B = the object's ann_id, 0 unlabelled). data.load_png reads them: expressions are the supervised phrases,
    filler the rest, so the phrase selector learns which spans of a text to ground."""
    out = os.path.join(root, "narratives")
    meta = dict(version=1, seed=seed, refer=_load_meta(os.path.join(root, "synthetic", "meta.json")))
    if os.path.isfile(os.path.join(out, "meta.json")) and _load_meta(os.path.join(out, "meta.json")) == meta:
        return out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(root, "synthetic", "instances.json")) as f:
        instances = json.load(f)
    images = {im["id"]: im for im in instances["images"]}
    anns = {}
    for a in instances["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    with open(os.path.join(root, "synthetic", "refs(unc).p"), "rb") as f:
        refs = pickle.load(f)
    categories = [dict(id=i + 1, name=s, isthing=1) for i, s in enumerate(SHAPES)]
    for s, split in enumerate(splits):
        rng = np.random.default_rng([seed, 100 + s])
        by_image = {}
        for r in refs:
            if r["split"] == split:
                by_image.setdefault(r["image_id"], []).append(r)
        os.makedirs(os.path.join(out, f"panoptic_{split}"), exist_ok=True)
        narratives, annotations = [], []
        for image_id, rs in by_image.items():
            im = images[image_id]
            H, W = im["height"], im["width"]
            ids = np.zeros((H, W), np.int64)
            for a in anns[image_id]:
                ids[decode_mask(a["segmentation"], H, W)] = a["id"]
            png = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
            png_name = os.path.splitext(im["file_name"])[0] + ".png"
            Image.fromarray(png).save(os.path.join(out, f"panoptic_{split}", png_name))
            annotations.append(dict(image_id=image_id, file_name=png_name, segments_info=[
                dict(id=a["id"], category_id=a["category_id"], iscrowd=0, area=a["area"], bbox=a["bbox"])
                for a in anns[image_id]]))
            chosen = [rs[i] for i in rng.permutation(len(rs))[:int(rng.integers(2, 4))]]
            segments = [dict(utterance=str(rng.choice(OPENINGS)), segment_ids=[], plural=False)]
            for k, r in enumerate(chosen):
                if k:
                    segments.append(dict(utterance=str(rng.choice(FILLERS[1:])), segment_ids=[], plural=False))
                sentence = r["sentences"][int(rng.integers(len(r["sentences"])))]["sent"]
                segments.append(dict(utterance=sentence, segment_ids=[str(r["ann_id"])], plural=False))
            segments.append(dict(utterance=str(rng.choice(ENDINGS)), segment_ids=[], plural=False))
            narratives.append(dict(image_id=str(image_id), segments=segments))  # a string, as in the release
        with open(os.path.join(out, f"png_{split}.json"), "w") as f:
            json.dump(narratives, f)
        with open(os.path.join(out, f"panoptic_{split}.json"), "w") as f:
            json.dump(dict(images=[images[i] for i in by_image], annotations=annotations, categories=categories), f)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    return out


def keyword_spans(text):
    """The demo's baseline selector: every maximal run of colour and shape words of `text` -> character spans."""
    import re
    words = set(SHAPES) | set(COLOURS)
    spans = []
    for m in re.finditer(r"[A-Za-z]+", text):
        if m.group().lower() in words:
            if spans and not text[spans[-1][1]:m.start()].strip():  # only whitespace between: the same run
                spans[-1] = (spans[-1][0], m.end())
            else:
                spans.append((m.start(), m.end()))
    return spans


def keyword_baseline(png_json):
    """Span precision / recall / F1 (exact match, %) of keyword_spans on the narratives of a PNG json, the gold spans
    being the grounded utterances in the narrative text as data.load_png joins it (utterances stripped, " " between)."""
    from selector import span_counts, span_scores
    with open(png_json) as f:
        narratives = json.load(f)
    counts = np.zeros(3, np.int64)
    for narrative in narratives:
        text, gold = "", []
        for seg in narrative["segments"]:
            utterance = seg["utterance"].strip()
            if not utterance:
                continue
            text += " " if text else ""
            if seg["segment_ids"]:
                gold.append((len(text), len(text) + len(utterance)))
            text += utterance
        counts += span_counts(keyword_spans(text), gold)
    return span_scores(*counts.tolist())
