"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL inputs by hand: smart-resize, patchify, the chat layout with phrase spans, batching.

Bit-identical to transformers' `Qwen2VLImageProcessorPil` built with a checkpoint's own settings (`image_settings`;
tests/test_qwen_inputs.py checks it), with no torchvision and no processor object. Conventions: images are PIL, sizes
are `(height, width)`, one image is `image_grid_thw = [[1, gh, gw]]` (gh, gw in patches of `patch_size` px, both
even), its `pixel_values` are `(gh*gw, 3*temporal*patch*patch)` rows in 2x2 merge-block order (1176 columns for
Qwen2/2.5-VL's 14-px patches, 1536 for Qwen3-VL's 16-px ones), and it becomes `gh*gw // 4` `<|image_pad|>` tokens.
"""
import functools
import json
import math
import os

import numpy as np
import torch
from PIL import Image

MIN_PIXELS = 3136  # preprocessor_config.json of Qwen2.5-VL-*-Instruct (56*56)
MAX_PIXELS = 12845056  # idem (28*28*16384); transformers' class default (1003520) is different
PATCH = 14  # vision patch side, pixels (Qwen2/2.5-VL; Qwen3-VL: 16)
MERGE = 2  # 2x2 patches merge into one LLM token (every family)
TEMPORAL = 2  # a still image is duplicated to 2 frames
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH  # 1176 values per pixel_values row (Qwen3-VL: 1536)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
SYSTEM = "You are a helpful assistant."
DEFAULT_PROMPT = "Please describe the objects in this image."  # F-LMM: the expressions are the answer
# Qwen2VLImageProcessor's class defaults: what a preprocessor_config.json that leaves a key out gets
PROCESSOR_DEFAULTS = dict(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}, patch_size=14,
                          temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN.tolist(),
                          image_std=CLIP_STD.tolist())


def smart_resize(height, width, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """(height, width) -> (h, w): multiples of `factor`, h*w within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h, w = round(height / factor) * factor, round(width / factor) * factor  # Python round: halves to even
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(image):
    """Any PIL mode -> RGB; transparency is composited on white, as the official processor does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def resized_rgb(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, factor=PATCH * MERGE):
    """The uint8 RGB image the vision tower sees, (h, w, 3) with h, w multiples of `factor` (patch * merge)."""
    image = to_rgb(image)
    h, w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    return np.asarray(image.resize((w, h), Image.BICUBIC))  # PIL skips the resample when the size is unchanged


@functools.lru_cache(maxsize=8)
def normalise_lut(mean, std):
    """(3, 256) float32: the normalised value of every uint8 level per channel, with the official arithmetic
    (rescale by 1/255 in float64, cast to float32, then (x - mean) / std in float32). A uint8 image has only
    256 levels per channel, so a table look-up gives the same bits as normalising every pixel, much faster."""
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.array(mean, dtype=np.float32), np.array(std, dtype=np.float32)
    return (levels[None, :] - mean[:, None]) / std[:, None]


def patchify(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, *, patch_size=PATCH, merge_size=MERGE,
             temporal_patch_size=TEMPORAL, image_mean=CLIP_MEAN, image_std=CLIP_STD):
    """PIL image -> pixel_values float32 (gh*gw, 3*temporal*patch*patch), image_grid_thw int64 (1, 3) = [[1, gh, gw]].
    The defaults are Qwen2.5-VL's; `patchify(image, **image_settings(checkpoint))` follows any checkpoint."""
    p, m, t = patch_size, merge_size, temporal_patch_size
    rgb = resized_rgb(image, min_pixels, max_pixels, factor=p * m)
    h, w = rgb.shape[:2]
    gh, gw = h // p, w // p
    # reorder the uint8 pixels first (a quarter of the bytes of float32):
    # (gh/m, m, p, gw/m, m, p, 3) -> (gh/m, gw/m, m, m, 3, p, p): rows in merge-block order, raster blocks
    x = rgb.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5).reshape(gh * gw, 3, p * p)
    lut = normalise_lut(tuple(float(v) for v in image_mean), tuple(float(v) for v in image_std))
    out = np.empty((gh * gw, 3, t, p * p), np.float32)  # the frame repeated along time
    for c in range(3):
        out[:, c, :] = lut[c][x[:, c]][:, None]
    return torch.from_numpy(out.reshape(gh * gw, 3 * t * p * p)), torch.tensor([[1, gh, gw]], dtype=torch.int64)


def image_settings(name_or_path):
    """A checkpoint's image processor settings -> the keyword arguments of `patchify` (min_pixels, max_pixels,
    patch_size, merge_size, temporal_patch_size, image_mean, image_std), read from its preprocessor_config.json the
    way Qwen2VLImageProcessor reads it: `min_pixels`/`max_pixels` (Qwen2/2.5-VL) override `size: {shortest_edge,
    longest_edge}` (Qwen3-VL), missing keys take the class defaults. A local directory, or a Hub id whose file is in
    the local cache or can be downloaded (huggingface_hub; works offline once cached). Settings patchify cannot
    reproduce (no resize, another resample or rescale) are an error."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "preprocessor_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing; the checkpoint's image settings (patch size, pixel bounds, "
                                    f"mean/std) are read from it")
    else:
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(name_or_path, "preprocessor_config.json")
    with open(path) as f:
        raw = json.load(f)
    for key, ok in (("do_resize", True), ("do_rescale", True), ("do_normalize", True), ("do_convert_rgb", True),
                    ("resample", 3), ("rescale_factor", 1 / 255)):  # 3: PIL bicubic
        if key in raw and raw[key] != ok:
            raise ValueError(f"{path}: {key}={raw[key]!r}; qwen_inputs.patchify reproduces only {key}={ok!r}")
    cfg = {**PROCESSOR_DEFAULTS, **raw}
    size = dict(cfg["size"])
    size["shortest_edge"] = cfg.get("min_pixels") or size.get("shortest_edge")  # as the processor: null = absent
    size["longest_edge"] = cfg.get("max_pixels") or size.get("longest_edge")
    if not size["shortest_edge"] or not size["longest_edge"]:
        raise ValueError(f"{path}: no pixel bounds (min_pixels/max_pixels or size: {{shortest_edge, longest_edge}})")
    return dict(min_pixels=int(size["shortest_edge"]), max_pixels=int(size["longest_edge"]),
                patch_size=int(cfg["patch_size"]), merge_size=int(cfg["merge_size"]),
                temporal_patch_size=int(cfg["temporal_patch_size"]), image_mean=[float(v) for v in cfg["image_mean"]],
                image_std=[float(v) for v in cfg["image_std"]])


@functools.lru_cache(maxsize=32)
def _template_ids(tokenizer, prompt):
    """The token ids before and after the image pads, tokenized once per (tokenizer, prompt), not once a sample."""
    head = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>",
            f"<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n")
    return tuple(tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in head)


def _prefix_ids(tokenizer, image_grid_thw, prompt):
    """The chat prefix up to the assistant turn's opening: (ids, first image token, number of image tokens)."""
    grid = torch.as_tensor(image_grid_thw).reshape(-1)
    if grid.numel() != 3 or int(grid[1]) % MERGE or int(grid[2]) % MERGE:
        raise ValueError(f"build_inputs: image_grid_thw must be one [t, gh, gw] row with even gh, gw, got {grid.tolist()}")
    n_image = int(grid.prod()) // (MERGE * MERGE)
    before, after = _template_ids(tokenizer, prompt)
    return list(before) + [tokenizer.convert_tokens_to_ids("<|image_pad|>")] * n_image + list(after), len(before), n_image


def _answer_ids(tokenizer, phrases, sep, first=0):
    """An assistant answer made of `phrases` joined by `sep` -> (ids, mask_ids): mask_ids first + k on the tokens of
    phrases[k], -1 on the separators."""
    if not phrases:
        raise ValueError("build_inputs: no phrases given")
    ids, mask_ids = [], []
    for k, phrase in enumerate(phrases):
        if not phrase.strip():
            raise ValueError(f"build_inputs: phrase {k} is empty ({phrase!r})")
        lead = sep if k else ""
        enc = tokenizer(lead + phrase, add_special_tokens=False, return_offsets_mapping=True)
        # a token belongs to the phrase if its characters overlap the phrase's characters
        own = [end > len(lead) for _, end in enc["offset_mapping"]]
        if not any(own):
            raise ValueError(f"build_inputs: phrase {k} ({phrase!r}) tokenizes to nothing")
        ids += enc["input_ids"]
        mask_ids += [first + k if o else -1 for o in own]
    return ids, mask_ids


def _sample(ids, mask_ids, image_start, n_image, segment_ids=None):
    input_ids = torch.tensor(ids, dtype=torch.int64)
    mm_token_type_ids = torch.zeros_like(input_ids)
    mm_token_type_ids[image_start:image_start + n_image] = 1
    out = dict(input_ids=input_ids, mm_token_type_ids=mm_token_type_ids, mask_ids=torch.tensor(mask_ids))
    if segment_ids is not None:
        out["segment_ids"] = torch.tensor(segment_ids, dtype=torch.int64)
    return out


def prompt_ids(tokenizer, image_grid_thw, prompt):
    """The chat up to the assistant's turn with `prompt` as the user's question, as build_inputs lays out the part
    before the phrases (chat.py and the VLM's boxes generate from it): 1-D int64 input_ids, mm_token_type_ids."""
    ids, image_start, n_image = _prefix_ids(tokenizer, image_grid_thw, prompt)
    sample = _sample(ids, [-1] * len(ids), image_start, n_image)
    return sample["input_ids"], sample["mm_token_type_ids"]


def build_inputs(tokenizer, image_grid_thw, phrases, prompt=DEFAULT_PROMPT, sep="\n", max_length=None):
    """One sample's token sequence, laid out from pieces so every phrase span is known by construction.

    <|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user\\n<|vision_start|><|image_pad|>*n<|vision_end|>
    {prompt}<|im_end|>\\n<|im_start|>assistant\\n{phrase_0}{sep}{phrase_1}...   (nothing after the last phrase)

    Returns 1-D int64 tensors: input_ids, mm_token_type_ids (1 exactly on <|image_pad|>), mask_ids (k on the
    tokens of phrases[k], -1 elsewhere). A separator's leading whitespace that BPE fuses into the first word
    (sep=" " in a narrative) is kept out of the text but its token counts as the phrase's.
    """
    ids, image_start, n_image = _prefix_ids(tokenizer, image_grid_thw, prompt)
    answer, answer_mask = _answer_ids(tokenizer, phrases, sep)
    if max_length is not None and len(ids) + len(answer) > max_length:
        raise ValueError(f"build_inputs: {len(ids) + len(answer)} tokens ({n_image} image tokens, {len(phrases)} "
                         f"phrases) exceed max_length={max_length}; lower max_pixels or use fewer phrases per sample")
    return _sample(ids + answer, [-1] * len(ids) + answer_mask, image_start, n_image)


def build_packed(tokenizer, image_grid_thw, sentences, prompt=DEFAULT_PROMPT, sep="\n"):
    """Several independent answers about one image behind ONE shared prefix: the chat prefix of build_inputs (image
    tokens, prompt, the assistant turn's opening), then sentence 0's answer tokens, sentence 1's, ... `sentences` is
    a list of phrase lists, each one assistant answer as build_inputs lays it out (usually one phrase).

    Returns 1-D int64 tensors input_ids, mm_token_type_ids, mask_ids (phrases numbered over all sentences, in order),
    segment_ids (0 on the shared prefix, s + 1 on sentence s's tokens). model.frozen_outputs gives every sentence of
    a packed sample what it gives in its own build_inputs sequence: it sees the prefix and itself only, at the
    positions it would have alone. `batching.split_packed` cuts a long one into several, each with its own
    prefix."""
    ids, image_start, n_image = _prefix_ids(tokenizer, image_grid_thw, prompt)
    if not sentences:
        raise ValueError("build_packed: no sentences given")
    mask_ids, segment_ids, first = [-1] * len(ids), [0] * len(ids), 0
    for s, phrases in enumerate(sentences):
        answer, answer_mask = _answer_ids(tokenizer, phrases, sep, first)
        ids += answer
        mask_ids += answer_mask
        segment_ids += [s + 1] * len(answer)
        first += len(phrases)
    return _sample(ids, mask_ids, image_start, n_image, segment_ids)


def collate(samples):
    """List of samples -> batch. Right padding (pad id 0, masked out by attention_mask), mask_ids -1 on pad;
    pixel_values concatenated in batch order; image_grid_thw (B, 3); every other key becomes a list. When any sample
    is packed (build_packed), segment_ids (B, S) too: 0 on padding, and a build_inputs sample is one sentence (1 from
    its first phrase token on)."""
    B, S = len(samples), max(len(s["input_ids"]) for s in samples)
    batch = dict(input_ids=torch.zeros(B, S, dtype=torch.int64), attention_mask=torch.zeros(B, S, dtype=torch.int64),
                 mm_token_type_ids=torch.zeros(B, S, dtype=torch.int64), mask_ids=torch.full((B, S), -1))
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        batch["input_ids"][i, :n] = s["input_ids"]
        batch["attention_mask"][i, :n] = 1
        batch["mm_token_type_ids"][i, :n] = s["mm_token_type_ids"]
        batch["mask_ids"][i, :n] = s["mask_ids"]
    if any("segment_ids" in s for s in samples):
        batch["segment_ids"] = torch.zeros(B, S, dtype=torch.int64)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            batch["segment_ids"][i, :n] = s["segment_ids"] if "segment_ids" in s else torch.cumsum(s["mask_ids"] >= 0, 0) > 0
    batch["pixel_values"] = torch.cat([s["pixel_values"] for s in samples])
    batch["image_grid_thw"] = torch.cat([torch.as_tensor(s["image_grid_thw"]).reshape(1, 3) for s in samples])
    for key in samples[0]:
        if key not in batch:
            batch[key] = [s[key] for s in samples]
    return batch


def check_pixels(pixel_values, image_grid_thw, patch_dim=None):
    """Raise a readable ValueError unless pixel_values is (sum of t*gh*gw, patch_dim) for image_grid_thw (B, 3).
    patch_dim: the row width the vision tower takes (3*temporal*patch*patch: 1176, Qwen3-VL 1536); None: any."""
    if image_grid_thw is None:
        raise ValueError("image_grid_thw is missing: it is the only record of each image's patch grid and cannot be "
                         "recovered from pixel_values; keep the one qwen_inputs.patchify returned with each image")
    if pixel_values is None or pixel_values.dim() != 2 or pixel_values.shape[1] != (patch_dim or pixel_values.shape[1]):
        shape = None if pixel_values is None else tuple(pixel_values.shape)
        raise ValueError(f"pixel_values must be 2-D (num_patches, {patch_dim or '3*temporal*patch*patch'}) as "
                         f"qwen_inputs.patchify makes it with the checkpoint's image_settings, got shape {shape} (an "
                         f"image tensor [B, C, H, W] is not Qwen-VL input; 1176 columns are 14-px patches, 1536 16-px)")
    grid = torch.as_tensor(image_grid_thw)
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be (num_images, 3), got shape {tuple(grid.shape)}")
    odd = [i for i, (_, gh, gw) in enumerate(grid.tolist()) if gh % MERGE or gw % MERGE]
    if odd:
        raise ValueError(f"image_grid_thw rows {odd} have odd sides {grid[odd].tolist()}; 2x2 merging needs even ones")
    per_image = grid.prod(-1)
    if pixel_values.shape[0] != int(per_image.sum()):
        n, expect = pixel_values.shape[0], int(per_image.sum())
        hint = f" = {n / expect:g} times as many" if n % expect == 0 else ""
        raise ValueError(f"pixel_values holds {n} patch rows but image_grid_thw {grid.tolist()} describes "
                         f"{len(grid)} image(s) with {expect} patches{hint}: every image in the batch needs its own "
                         f"image_grid_thw row, and pixel_values must be the patches of exactly those images")


def check_inputs(batch, image_token_id=None, patch_dim=None):
    """The consistency check run before every forward of the frozen model (raises ValueError naming the sample);
    image_token_id and patch_dim (pixel_values columns) are the model's, when given."""
    check_pixels(batch.get("pixel_values"), batch.get("image_grid_thw"), patch_dim)
    grid, mm = batch["image_grid_thw"], batch["mm_token_type_ids"]
    if len(grid) != len(batch["input_ids"]):
        raise ValueError(f"image_grid_thw has {len(grid)} rows for a batch of {len(batch['input_ids'])} sequences: "
                         f"one image per sample")
    expected = grid.prod(-1) // (MERGE * MERGE)
    counted = (mm == 1).sum(-1)
    for i in torch.nonzero(counted != expected).flatten().tolist():
        raise ValueError(f"sample {i}: {int(counted[i])} <|image_pad|> tokens but its image_grid_thw "
                         f"{grid[i].tolist()} needs {int(expected[i])} (= t*gh*gw/4)")
    if image_token_id is not None and not torch.equal(batch["input_ids"] == image_token_id, mm == 1):
        i = int(torch.nonzero((batch["input_ids"] == image_token_id) != (mm == 1))[0, 0])
        raise ValueError(f"sample {i}: mm_token_type_ids does not mark exactly the <|image_pad|> tokens "
                         f"(id {image_token_id}); was the sample built with another tokenizer?")
