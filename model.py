"""The frozen Qwen2.5-VL, phrase->image attention capture, and the mask head trained on it (F-LMM, CVPR 2025).

phrase_attention runs one forward of the frozen VLM on PyTorch SDPA (flash / cuDNN / memory-efficient kernels on
CUDA; never an S x S map) and returns, per phrase, the softmax attention from its tokens to the image tokens in
every layer and head. MaskHead is F-LMM's U-Net on that stack of maps; Grounder composes the two and holds the loss.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.vision_utils import get_vision_window_index

import qwen_inputs

# Qwen's special tokens, in Qwen's order (151643 ...); the tiny tokenizer appends them after its BPE vocab.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_PRETOKENIZE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def load_qwen(name_or_path, dtype=torch.bfloat16, device="cuda"):
    """A frozen Qwen2_5_VLForConditionalGeneration (eval, no grad, `use_fast_attention`) and its tokenizer, from a
    local directory or a Hub id. Never trust_remote_code: everything used is in transformers itself."""
    qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype)
    use_fast_attention(qwen)
    qwen.requires_grad_(False).eval().to(device)
    return qwen, AutoTokenizer.from_pretrained(name_or_path)


def use_fast_attention(qwen):
    """Text layers on SDPA with phrase capture, vision blocks on one padded SDPA call per block. Without a
    PhraseCapture the model computes exactly what stock SDPA computes (chat and generate are unaffected)."""
    qwen.set_attn_implementation({"text_config": CAPTURE_ATTENTION, "vision_config": VISION_ATTENTION})
    return qwen


def build_tiny_qwen(out_dir, texts, *, seed=0, hidden=128, layers=4, heads=4, kv_heads=2, vision_hidden=64,
                    vision_depth=2, vocab_size=512, init_std=0.02):
    """Write a random tiny Qwen2.5-VL and a BPE tokenizer trained on `texts` to `out_dir` (offline, seeded).

    The result loads with `load_qwen(out_dir)` like a real checkpoint: same classes, same chat layout, same
    special tokens (at other ids). head_dim = hidden // heads; mrope_section splits head_dim/2 as 1:1.5:1.5.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
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
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]
    section[0] += head_dim // 2 - sum(section)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                                            mrope_section=section),
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], initializer_range=init_std),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                           num_heads=max(1, vision_hidden // 32), out_hidden_size=hidden, window_size=112,
                           fullatt_block_indexes=[vision_depth - 1], initializer_range=init_std),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    qwen = Qwen2_5_VLForConditionalGeneration(cfg)
    os.makedirs(out_dir, exist_ok=True)
    qwen.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------- attention capture

# Two attention functions, registered with transformers' public AttentionInterface and selected per sub-config
# in load_qwen. Both compute the model's output with PyTorch SDPA; neither builds an S x S map.
CAPTURE_ATTENTION = "sdpa_phrase_capture"  # text: SDPA, plus the phrase rows when phrase_attention asks for them
# Vision: transformers passes a whole block's windows as one packed sequence with cu_seqlens only to
# implementations whose name contains "flash"; stock SDPA instead loops over every window in Python (30 per
# 640x480 image in each of 28 blocks), which dominates a batched forward on a GPU.
VISION_ATTENTION = "flash_style_varlen_sdpa"


class PhraseCapture:
    """What the text attention function needs to record one layer's phrase rows, built once per forward.

    rows (B, R): positions of the phrase tokens; avg (B, P, R): phrase-mean weights over them; cols (B, N): image
    token positions in raster order; keys_ok (B, R, S): causal and padding mask of each row. `maps` collects one
    (B, P, H, N) float32 tensor per layer, in layer order."""

    def __init__(self, rows, avg, cols, keys_ok):
        self.rows, self.avg, self.cols, self.keys_ok, self.maps = rows, avg, cols, keys_ok, []

    def record(self, query, key, scaling):
        """query (B, H, S, D) and key (B, KV, S, D) as the layer's attention sees them (after M-RoPE)."""
        B, H, S, D = query.shape
        KV, R = key.shape[1], self.rows.shape[1]
        with torch.autocast(query.device.type, enabled=False):  # the captured softmax is float32 under any AMP
            q = query.gather(2, self.rows[:, None, :, None].expand(B, H, R, D)).float()  # (B, H, R, D)
            # GQA: query head h reads kv head h // (H // KV); grouping q as (KV, H/KV) avoids repeating keys
            q = q.view(B, KV, H // KV, R, D)
            scores = q @ key.float()[:, :, None].transpose(-1, -2) * scaling  # (B, KV, H/KV, R, S)
            scores = scores.masked_fill(~self.keys_ok[:, None, None], float("-inf"))
            probs = scores.softmax(-1).view(B, H, R, S)  # over all keys, as eager attention normalises
            probs = probs.gather(-1, self.cols[:, None, None].expand(B, H, R, -1))  # (B, H, R, N) image columns
            self.maps.append(torch.einsum("bpr,bhrn->bphn", self.avg, probs))  # mean over each phrase's rows


def capture_attention(module, query, key, value, attention_mask, scaling=None, phrase_capture=None, **kwargs):
    """SDPA for the layer output; with a PhraseCapture (passed by phrase_attention as a forward kwarg, which
    transformers hands to every attention call) also the phrase rows of the attention probabilities."""
    out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if phrase_capture is not None:
        phrase_capture.record(query, key, module.scaling if scaling is None else scaling)
    return out


def varlen_vision_attention(module, query, key, value, attention_mask=None, scaling=None, cu_seq_lens_q=None,
                            max_length_q=None, **kwargs):
    """Non-causal attention within each packed sequence of cu_seq_lens_q (the vision tower's windows, or whole
    images in its full-attention blocks) as one padded SDPA call. query/key/value (1, heads, T, D) ->
    ((1, T, heads, D), None), the layout transformers' flash path expects."""
    _, heads, T, D = query.shape
    cu = cu_seq_lens_q.to(query.device, torch.int64)
    lengths = cu[1:] - cu[:-1]  # (n,)
    n, L = len(lengths), int(max_length_q) if max_length_q is not None else int(lengths.max())
    offsets = torch.arange(L, device=query.device)
    valid = offsets < lengths[:, None]  # (n, L)
    index = (cu[:-1, None] + offsets).masked_fill(~valid, 0)  # (n, L) packed position of each padded slot
    q, k, v = (x[0][:, index].transpose(0, 1) for x in (query, key, value))  # (n, heads, L, D) each
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=scaling)
    # back to packed order by an integer gather (a boolean mask would sync with the GPU in every block)
    t = torch.arange(T, device=query.device)
    seq = torch.searchsorted(cu[1:], t, right=True)  # (T,) the sequence of each packed position
    return out.transpose(1, 2).reshape(n * L, heads, D)[seq * L + t - cu[seq]][None], None  # (1, T, heads, D)


AttentionInterface.register(CAPTURE_ATTENTION, capture_attention)
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)  # without it the model would build no mask
AttentionInterface.register(VISION_ATTENTION, varlen_vision_attention)


def _first_positions(flags):
    """(B, S) bool -> positions (B, M) of the True entries, left-aligned, and valid (B, M); M = max count.
    Padding slots point at position 0 and are False in `valid`."""
    count = flags.sum(1)
    order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True)  # True entries first, in sequence order
    valid = torch.arange(int(count.max()), device=flags.device) < count[:, None]
    return order[:, :valid.shape[1]].masked_fill(~valid, 0), valid


def _raster_features(x, grid, visual):
    """Merger input (num_patches, C_vis) in the vision tower's window order -> one (C_vis, gh, gw) per image.

    The tower permutes 2x2 merge blocks into window order (`window_index`) before its blocks and un-permutes
    only after the merger; recompute the same index with transformers' own function and invert it."""
    window_index, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                              window_size=visual.window_size, patch_size=visual.patch_size)
    unit = visual.spatial_merge_unit
    x = x.view(-1, unit, x.shape[-1])[torch.argsort(window_index).to(x.device)]  # (blocks, 4, C) merge-block order
    feats, start = [], 0
    for t, gh, gw in grid.tolist():
        n = t * gh * gw // unit
        f = x[start:start + n].view(gh // 2, gw // 2, 2, 2, -1)  # blocks in raster order, 2x2 patches inside
        feats.append(f.permute(4, 0, 2, 1, 3).reshape(-1, gh, gw).float())  # (C_vis, gh, gw)
        start += n
    return feats


@torch.no_grad()
def phrase_attention(qwen, batch, *, vision=False):
    """Frozen Qwen2.5-VL forward -> one float32 (L*H, gh/2, gw/2) map per phrase, batch then phrase order.

    Channel `layer*H + head` holds the softmax attention probability (over all keys, causal and padding
    masked, as eager attention computes it) from the phrase's tokens to each image token, averaged over the
    phrase's tokens and not renormalised; the image tokens in raster order over (gh/2, gw/2). `batch` is a
    `qwen_inputs.collate` batch (right-padded, `mask_ids` k on phrase k's tokens). With vision=True also
    returns the vision tower's last-block patch features (before the 2x2 merger), one float32
    (C_vis, gh, gw) per image. Needs the attention set by `use_fast_attention` (load_qwen does it).
    """
    if qwen.config.text_config._attn_implementation != CAPTURE_ATTENTION:
        raise ValueError(f"phrase_attention: the text attention is {qwen.config.text_config._attn_implementation!r}; "
                         f"call model.use_fast_attention(qwen) (load_qwen does) so that it is {CAPTURE_ATTENTION!r}")
    qwen_inputs.check_inputs(batch, qwen.config.image_token_id)
    device = qwen.device
    # All index bookkeeping happens on the CPU copies the DataLoader made: on the GPU every .max()/.any() below
    # would be a host sync inside the training step. Only the small index tensors travel.
    mask_ids = batch["mask_ids"].cpu()
    no_phrase = ~(mask_ids >= 0).any(1)
    if no_phrase.any():
        raise ValueError(f"phrase_attention: samples {no_phrase.nonzero().flatten().tolist()} have no phrase tokens")
    # causal: nothing after the batch's last phrase token changes any phrase row, so it is not fed
    S = int((mask_ids >= 0).nonzero()[:, 1].max()) + 1
    mask_ids = mask_ids[:, :S]
    attention_mask, mm_token_type_ids = batch["attention_mask"].cpu()[:, :S], batch["mm_token_type_ids"].cpu()[:, :S]

    rows, row_valid = _first_positions(mask_ids >= 0)  # (B, R) positions of phrase tokens
    row_phrase = mask_ids.gather(1, rows).masked_fill(~row_valid, -1)  # (B, R) phrase index of each row
    num_phrases = mask_ids.max(1).values + 1  # (B,)
    onehot = (row_phrase[:, None, :] == torch.arange(int(num_phrases.max()))[:, None]).float()
    tokens = onehot.sum(-1)  # (B, P) tokens per phrase
    empty = (tokens == 0) & (torch.arange(tokens.shape[1]) < num_phrases[:, None])
    if empty.any():
        raise ValueError(f"phrase_attention: (sample, phrase) {empty.nonzero().tolist()} have no tokens in mask_ids")
    avg = onehot / tokens.clamp(min=1)[..., None]  # (B, P, R) averaging matrix: the phrase mean is one einsum
    cols, _ = _first_positions(mm_token_type_ids == 1)  # (B, N) image token positions, raster order
    keys_ok = (torch.arange(S) <= rows[..., None]) & attention_mask.bool()[:, None]  # (B, R, S) causal + padding
    rows, avg, cols, keys_ok = (t.to(device, non_blocking=True) for t in (rows, avg, cols, keys_ok))
    inputs = dict(input_ids=batch["input_ids"][:, :S], attention_mask=attention_mask,
                  mm_token_type_ids=mm_token_type_ids, pixel_values=batch["pixel_values"],
                  image_grid_thw=batch["image_grid_thw"])
    inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}

    capture, vis = PhraseCapture(rows, avg, cols, keys_ok), []
    handle = None
    if vision:  # the merger's input: (num_patches, C_vis) after the last block, in window order
        handle = qwen.model.visual.merger.register_forward_pre_hook(lambda merger, args: vis.append(args[0]))
    try:  # the base model: no lm_head, its logits are not needed
        qwen.model(**inputs, use_cache=False, phrase_capture=capture)
    finally:
        if handle is not None:
            handle.remove()

    layers = len(capture.maps)  # one per decoder layer
    B, P, H, N = capture.maps[0].shape
    stack = torch.stack(capture.maps, 2).view(B, P, layers * H, N)  # (B, P, L*H, N), channel layer*H + head
    maps = []
    for b, ((_, gh, gw), k) in enumerate(zip(batch["image_grid_thw"].tolist(), num_phrases.tolist())):
        maps += [stack[b, p, :, :gh * gw // 4].reshape(-1, gh // 2, gw // 2) for p in range(k)]  # (L*H, gh/2, gw/2)
    if not vision:
        return maps
    return maps, _raster_features(vis[0], batch["image_grid_thw"], qwen.model.visual)


# ------------------------------------------------------------------------------------------------ mask head

def same_size_groups(tensors):
    """Indices of `tensors` grouped by their last two dims, in first-seen order: each group stacks into one batch."""
    groups = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape[-2:]), []).append(i)
    return list(groups.values())


def _conv_block(cin, cout):
    """Two 3x3 conv + GroupNorm + ReLU: the mmseg U-Net block F-LMM's head is built from."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(math.gcd(32, cout), cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(math.gcd(32, cout), cout), nn.ReLU(inplace=True))


class MaskHead(nn.Module):
    """F-LMM's U-Net on the L*H phrase attention maps (optionally plus frozen vision features) -> mask logits.

    Each channel is normalised to sum 1 over the image tokens, resized (bilinear) so the long side is `size`,
    zero-padded to a multiple of 8 for the three 2x downsamplings, run through 4 stages of base*(1, 2, 4, 8)
    channels with skip connections, cropped back and upsampled to the resized image (gh*14, gw*14).
    vision_channels > 0 adds the frozen vision patch features (14-px grid, a 1x1 projection to `base`
    channels) to the finest decoder stage, whose resolution is the closest to theirs.
    """

    def __init__(self, *, in_channels, base=64, vision_channels=0, size=64):
        super().__init__()
        self.in_channels, self.vision_channels, self.size = in_channels, vision_channels, size
        chans = [base, base * 2, base * 4, base * 8]
        self.down = nn.ModuleList(_conv_block(cin, c) for cin, c in zip([in_channels] + chans[:-1], chans))
        extra = [base if vision_channels else 0, 0, 0]  # vision features join the finest stage only
        self.up = nn.ModuleList(_conv_block(chans[i + 1] + chans[i] + extra[i], chans[i]) for i in range(3))
        self.vision_proj = nn.Sequential(nn.Conv2d(vision_channels, base, 1, bias=False),
                                         nn.GroupNorm(math.gcd(32, base), base),
                                         nn.ReLU(inplace=True)) if vision_channels else None
        self.out = nn.Conv2d(base, 1, 1)

    def forward(self, maps, feats=None):
        """maps: list of (in_channels, h, w) float, one per phrase; feats: with vision_channels, a list of
        (vision_channels, 2h, 2w), one per phrase (its image's features), else None.
        Returns a list of (28h, 28w) logits. Phrases with equal (h, w) run as one batch, one call for all
        groups so that DDP sees one forward per backward."""
        if (feats is not None) != bool(self.vision_channels):
            got = "None" if feats is None else "vision features"
            raise ValueError(f"MaskHead(vision_channels={self.vision_channels}) got feats={got}")
        out = [None] * len(maps)
        for idx in same_size_groups(maps):
            v = torch.stack([feats[i] for i in idx]) if feats is not None else None
            for i, logit in zip(idx, self._forward_grid(torch.stack([maps[i] for i in idx]), v)):
                out[i] = logit
        return out

    def _forward_grid(self, x, v):
        """x (P, C, h, w), v (P, C_vis, 2h, 2w) or None -> (P, 28h, 28w) logits."""
        P, C, h, w = x.shape
        if C != self.in_channels:
            raise ValueError(f"MaskHead expects {self.in_channels} attention channels (L*H), got {C}")
        x = x.float()
        x = x / x.sum((-2, -1), keepdim=True).clamp_min(1e-12)  # each channel a distribution over image tokens
        hs, ws = max(1, round(h * self.size / max(h, w))), max(1, round(w * self.size / max(h, w)))
        x = F.interpolate(x, size=(hs, ws), mode="bilinear", align_corners=False)  # (P, C, hs, ws), long side 64
        pad = (0, -ws % 8, 0, -hs % 8)  # right, bottom: 3 poolings need sides divisible by 8
        x = F.pad(x, pad)
        skips = []
        for i, block in enumerate(self.down):
            x = block(F.max_pool2d(x, 2) if i else x)
            skips.append(x)  # (P, base*2^i, H8/2^i, W8/2^i)
        if v is not None:  # (P, C_vis, 2h, 2w) -> (P, base, hs, ws) padded like the maps
            v = F.pad(F.interpolate(self.vision_proj(v.to(x.dtype)), size=(hs, ws), mode="bilinear",
                                    align_corners=False), pad)
            skips[0] = torch.cat([skips[0], v], 1)
        for i in (2, 1, 0):
            x = F.interpolate(x, size=skips[i].shape[-2:], mode="bilinear", align_corners=False)
            x = self.up[i](torch.cat([x, skips[i]], 1))
        x = self.out(x)[:, :, :hs, :ws]  # (P, 1, hs, ws): padding cropped off
        return F.interpolate(x, size=(28 * h, 28 * w), mode="bilinear", align_corners=False)[:, 0]


def load_head(head, state_dict):
    """Load head weights, failing with the exact missing and unexpected keys (a head built with other kwargs)."""
    missing, unexpected = head.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise KeyError(f"head checkpoint does not fit MaskHead(in_channels={head.in_channels}, "
                       f"vision_channels={head.vision_channels}): missing {missing}, unexpected {unexpected}")
    return head


# ------------------------------------------------------------------------------------------------- grounder

class Grounder(nn.Module):
    """Frozen Qwen2.5-VL + trainable MaskHead. Only `head` is a submodule: parameters(), state_dict(),
    .to() and .train() see the head alone. Qwen is kept out of the module registry with object.__setattr__
    (it stays frozen, in eval mode, on its own device). train.py may replace `grounder.head` with
    DDP(head): the head is called exactly once per forward, as `self.head(maps, feats)`."""

    def __init__(self, qwen, head):
        super().__init__()
        object.__setattr__(self, "qwen", qwen)  # a plain attribute, not a submodule: never trained or saved
        self.head = head
        self.vision = head.vision_channels > 0  # read once: a DDP wrapper hides the attribute

    def forward(self, batch):
        """collate batch -> list of (gh*14, gw*14) logits, one per phrase (batch then phrase order)."""
        out = phrase_attention(self.qwen, batch, vision=self.vision)  # under no_grad: the VLM is frozen
        maps, feats = out if self.vision else (out, None)
        if feats is not None:  # each phrase gets its image's features
            feats = [f for f, k in zip(feats, qwen_inputs.phrase_counts(batch)) for _ in range(k)]
        return self.head(maps, feats)

    def supervised(self, batch, device):
        """(logits, masks) of the phrases that carry a mask (batch["supervised"], all if absent), masks
        float32 (gh*14, gw*14) on `device`."""
        logits = self(batch)
        masks = [m for ms in batch["masks"] for m in ms]
        keep = [bool(s) for ss in batch["supervised"] for s in ss] if "supervised" in batch else [True] * len(masks)
        return ([x for x, k in zip(logits, keep, strict=True) if k],
                [m.to(device, torch.float32, non_blocking=True) for m, k in zip(masks, keep, strict=True) if k])

    @staticmethod
    def loss(logits, masks):
        """BCE-with-logits + Dice (weight 1 each), each averaged over phrases -> (loss, dict(bce=, dice=))."""
        if not logits:
            raise ValueError("Grounder.loss: no phrases to supervise in this batch")
        for x, m in zip(logits, masks, strict=True):
            if x.shape != m.shape:
                raise ValueError(f"Grounder.loss: logits {tuple(x.shape)} vs mask {tuple(m.shape)}")
        bce, dice = [], []
        for idx in same_size_groups(logits):  # one stacked batch per image size: a few kernels, not a few per phrase
            x = torch.stack([logits[i] for i in idx]).float().flatten(1)  # (P, h*w)
            m = torch.stack([masks[i] for i in idx]).to(x.device, torch.float32).flatten(1)
            bce.append(F.binary_cross_entropy_with_logits(x, m, reduction="none").mean(1))  # (P,) per phrase
            p = x.sigmoid()
            dice.append(1 - (2 * (p * m).sum(1) + 1) / (p.sum(1) + m.sum(1) + 1))  # +1: empty masks are fine
        bce, dice = torch.cat(bce).mean(), torch.cat(dice).mean()
        return bce + dice, dict(bce=bce, dice=dice)
