"""The frozen VLM's own box for a phrase, as the refiner's box prompt (config `refiner: {box: vlm}`).

Each phrase is asked once, greedy, in the family's grounding format (build.extract, the frozen step; cache.py stores
the answers beside the maps, so training from a cache never generates):

    Qwen2.5-VL  "Locate <phrase> in the image, output its bbox coordinates in JSON format."
                -> ```json [{"bbox_2d": [x1, y1, x2, y2], "label": "..."}] ```   absolute pixels of the image as the
                model saw it: the smart_resize'd (grid_h * patch, grid_w * patch), not the original
    Qwen3-VL    the same question and JSON                                      0..1000 of the image's width, height
    Qwen2-VL    "Output the bounding box of <|object_ref_start|><phrase><|object_ref_end|> in the image."
                -> <|object_ref_start|>...<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>   0..1000

The parser reads both syntaxes for every family (the frame is the family's): the first "bbox_2d" of the JSON (code
fences and text around it allowed; a list or one object), else the first "(x1,y1),(x2,y2)" pair. With several boxes
the first is taken: one phrase was asked for, and the model lists the best match first (labels are short category
names, rarely the phrase itself, so matching them would mostly fail). A box is stored as fractions (x0, y0, x1, y1)
of the image's width and height, clipped to [0, 1] (counted), or None when there is none to use: no box, malformed,
or empty after clipping; the refiner then falls back to the coarse mask's box (counted). COUNTS holds the outcomes of
this process (generation and use); report() is the line train.py prints.
"""
import collections
import functools
import json
import re

import torch
from transformers import AutoTokenizer

import model
import qwen_inputs
import refiner

JSON_QUESTION = "Locate {phrase} in the image, output its bbox coordinates in JSON format."  # Qwen2.5-VL cookbook
QWEN2_QUESTION = "Output the bounding box of <|object_ref_start|>{phrase}<|object_ref_end|> in the image."
# Coordinate frame of each family's answer: "seen" = pixels of the resized image it saw; a number = that full scale.
FRAMES = {"qwen2_vl": 1000, "qwen2_5_vl": "seen", "qwen3_vl": 1000, "qwen3_vl_moe": 1000}
MAX_NEW_TOKENS = 64  # a fenced one-box JSON answer with a label of a few words is ~40 tokens
COUNTS = collections.Counter()  # this process's outcomes: ok, clipped, several, no box, malformed, empty; vlm, fallback
NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
PAIR = re.compile(rf"\({NUMBER},{NUMBER}\)\s*,?\s*\({NUMBER},{NUMBER}\)")


def question(phrase, model_type):
    """The grounding question for one phrase in the family's documented wording."""
    return (QWEN2_QUESTION if model_type == "qwen2_vl" else JSON_QUESTION).format(phrase=phrase)


def _json_boxes(text):
    """Every bbox_2d list in the first JSON value of `text` that parses (fences and prose around it allowed)."""
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"[\[{]", text)):
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        items = value if isinstance(value, list) else [value]
        return [item["bbox_2d"] for item in items if isinstance(item, dict) and "bbox_2d" in item]
    return []


def parse_box(text, model_type, seen_size):
    """The VLM's answer -> (box, outcome): box = (x0, y0, x1, y1) fractions of the image's width and height, clipped
    to [0, 1], or None; outcome one of ok, clipped, several (the first of several taken), no box, malformed (a
    bbox_2d that is not 4 numbers), empty (no area once clipped). seen_size: (h, w) pixels of the image the model saw
    (Qwen2.5-VL's frame)."""
    if model_type not in FRAMES:
        raise ValueError(f"vlmbox: no grounding format known for model_type {model_type!r}; known: {sorted(FRAMES)}")
    boxes = _json_boxes(text)
    if not boxes:
        boxes = [[float(v) for v in m.groups()] for m in PAIR.finditer(text)]
    if not boxes:
        return None, "no box"
    box = boxes[0]
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                             for v in box)):
        return None, "malformed"
    h, w = seen_size
    scale = (w, h, w, h) if FRAMES[model_type] == "seen" else (FRAMES[model_type],) * 4
    raw = [v / s for v, s in zip(box, scale)]
    clipped = [min(max(v, 0.0), 1.0) for v in raw]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None, "empty"
    return tuple(clipped), "clipped" if clipped != raw else "several" if len(boxes) > 1 else "ok"


@functools.lru_cache(maxsize=None)
def _tokenizer(name_or_path):
    return AutoTokenizer.from_pretrained(name_or_path)  # the checkpoint's own, as model.load_qwen loads it


@torch.no_grad()
def generate(qwen, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS):
    """Greedy answers to prompts laid out by qwen_inputs.prompt_ids (model.generate), special tokens kept up to
    <|im_end|>: Qwen2-VL's box tokens are special and must survive."""
    return model.generate(qwen, tokenizer, prompts, max_new_tokens=max_new_tokens, special=True)


def vlm_boxes(qwen, batch, max_new_tokens=MAX_NEW_TOKENS):
    """A collated batch on the device (its phrases, pixel_values, image_grid_thw) -> per sequence a list with each of
    its phrases' box (parse_box: fractions, or None). Generated greedy, one question per phrase; COUNTS updated."""
    if "phrases" not in batch:
        raise ValueError("refiner box=vlm asks the VLM for each phrase's box, but this batch has no phrases (chat.py's "
                         "answer spans are not supported): use box=mask")
    tokenizer = _tokenizer(qwen.name_or_path)
    family, patch = qwen.config.model_type, qwen.config.vision_config.patch_size
    grids = batch["image_grid_thw"].tolist()
    first = [0]
    for t, gh, gw in grids:
        first.append(first[-1] + t * gh * gw)
    prompts, seen = [], []
    for b, phrases in enumerate(batch["phrases"]):
        pixel_values = batch["pixel_values"][first[b]:first[b + 1]]  # (t*gh*gw, C) this sequence's image
        for phrase in phrases:
            prompts.append((*qwen_inputs.prompt_ids(tokenizer, grids[b], question(phrase, family)), pixel_values, grids[b]))
            seen.append((grids[b][1] * patch, grids[b][2] * patch))
    texts = generate(qwen, tokenizer, prompts, max_new_tokens)
    boxes = []
    for text, size in zip(texts, seen, strict=True):
        box, outcome = parse_box(text, family, size)
        COUNTS[outcome] += 1
        boxes.append(box)
    out, at = [], 0
    for phrases in batch["phrases"]:
        out.append(boxes[at:at + len(phrases)])
        at += len(phrases)
    return out


def sam_boxes(vlm_box, coarse, phrase_image, sam_sizes):
    """Per sequence the phrases' boxes (vlm_boxes, or read back from a cache) -> float (N, 4) box prompts (x0, y0,
    x1, y1) in each phrase's SAM frame (rh, rw), the end exclusive; a phrase without a box gets its coarse mask's
    (refiner.box_of), counted as a fallback. coarse: N U-Net logits; phrase_image, sam_sizes: as Refiner.forward."""
    flat = [box for sequence in vlm_box for box in sequence]  # batch then phrase order, as coarse
    if len(flat) != len(coarse):
        raise ValueError(f"vlm_box holds {len(flat)} boxes for {len(coarse)} phrases")
    out = []
    for box, c, i in zip(flat, coarse, phrase_image, strict=True):
        rh, rw = sam_sizes[i]
        COUNTS["fallback" if box is None else "vlm"] += 1
        out.append(refiner.box_of(c, (rh, rw)) if box is None else
                   torch.tensor(box, dtype=torch.float32, device=c.device) * c.new_tensor([rw, rh, rw, rh]).float())
    return torch.stack(out)


def report():
    """One line: how this process's VLM boxes went (empty when none were generated or used)."""
    if not COUNTS:
        return ""
    kinds = ("ok", "several", "clipped", "no box", "malformed", "empty")
    made = ", ".join(f"{k} {COUNTS[k]}" for k in kinds if COUNTS[k])
    return (f"VLM boxes: {sum(COUNTS[k] for k in kinds)} generated ({made or 'none here'}); "
            f"{COUNTS['vlm'] + COUNTS['fallback']} used, {COUNTS['fallback']} fell back to the coarse mask's box")
