"""The trainable part: F-LMM's U-Net mask head on the frozen outputs, the optional SAM refiner, and the loss.

Grounder(head, refiner) maps `model.frozen_outputs` (or the same dict read back from a cache) to mask logits per
phrase; phrase_losses scores them (BCE + Dice per phrase, on the coarse and the refined masks).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import selector as selection
import vlmbox


def same_size_groups(tensors):
    """Indices of `tensors` grouped by their last two dims, in first-seen order: each group stacks into one batch."""
    groups = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape[-2:]), []).append(i)
    return list(groups.values())


def bilinear_matrix(n_out, n_in, device=None, dtype=torch.float32):
    """(n_out, n_in): the weights of F.interpolate(mode="bilinear", align_corners=False) along one axis (no
    antialias): output pixel i reads source (i + 0.5) * n_in / n_out - 0.5, clamped to the edges."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    lo = src.floor().long().clamp_max(n_in - 1)
    frac, rows = src - lo, torch.arange(n_out)
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    a.index_put_((rows, lo), 1 - frac, accumulate=True)
    a.index_put_((rows, (lo + 1).clamp_max(n_in - 1)), frac, accumulate=True)
    return a.to(device=device, dtype=dtype)


def bilinear(x, size):
    """F.interpolate(x, size, mode="bilinear", align_corners=False) for (..., h, w) x as two matmuls: the same values
    (to float rounding), and forward + backward ~4x faster on a CPU at the head's output size, where
    upsample_bilinear2d's backward was the step's largest kernel after the convolutions. At least float32, also
    under autocast (bfloat16 weights would be off by ~0.4%); the loss reads float32 logits anyway."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return (bilinear_matrix(size[0], x.shape[-2], x.device, dtype) @ x.to(dtype)
                @ bilinear_matrix(size[1], x.shape[-1], x.device, dtype).T)


def _conv_block(cin, cout):
    """Two 3x3 conv + GroupNorm + ReLU: the mmseg U-Net block F-LMM's head is built from."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(math.gcd(32, cout), cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(math.gcd(32, cout), cout), nn.ReLU(inplace=True))


class MaskHead(nn.Module):
    """F-LMM's U-Net on the L*H phrase attention maps (optionally plus frozen vision features) -> mask logits.

    Each channel is normalised to sum 1 over the image tokens, resized (bilinear) so the long side is `size`,
    zero-padded to a multiple of 8 for the three 2x downsamplings, run through 4 stages of base*(1, 2, 4, 8)
    channels with skip connections, cropped back and upsampled to the resized image (token_px * (h, w)).
    vision_channels > 0 adds the frozen vision patch features (one per vision patch, 2x the token grid; a 1x1
    projection to `base` channels) to the finest decoder stage, whose resolution is the closest to theirs.
    """

    def __init__(self, *, in_channels, base=64, vision_channels=0, size=64, token_px=28):
        super().__init__()
        self.in_channels, self.vision_channels, self.size = in_channels, vision_channels, size
        self.token_px = token_px  # pixels per LLM image token: patch * merge (28 for Qwen2/2.5-VL, 32 for Qwen3-VL)
        chans = [base, base * 2, base * 4, base * 8]
        self.down = nn.ModuleList(_conv_block(cin, c) for cin, c in zip([in_channels] + chans[:-1], chans))
        extra = [base if vision_channels else 0, 0, 0]  # vision features join the finest stage only
        self.up = nn.ModuleList(_conv_block(chans[i + 1] + chans[i] + extra[i], chans[i]) for i in range(3))
        self.vision_proj = nn.Sequential(nn.Conv2d(vision_channels, base, 1, bias=False),
                                         nn.GroupNorm(math.gcd(32, base), base),
                                         nn.ReLU(inplace=True)) if vision_channels else None
        self.out = nn.Conv2d(base, 1, 1)

    def forward(self, maps, feats=None, same_as=None):
        """maps: list of (in_channels, h, w) float, one per phrase; feats: with vision_channels, a list of
        (vision_channels, 2h, 2w), one per phrase (its image's features), else None; same_as: None, or per phrase
        the index of an earlier phrase with equal maps and features (cached.collate finds them), whose logits it
        shares instead of running the U-Net again.
        Returns a list of (token_px*h, token_px*w) logits. Phrases with equal (h, w) run as one batch, one call
        for all groups so that DDP sees one forward per backward."""
        if (feats is not None) != bool(self.vision_channels):
            got = "None" if feats is None else "vision features"
            raise ValueError(f"MaskHead(vision_channels={self.vision_channels}) got feats={got}")
        for i, (m, f) in enumerate(zip(maps, feats, strict=True) if feats is not None else []):
            if f.shape != (self.vision_channels, 2 * m.shape[-2], 2 * m.shape[-1]):
                raise ValueError(f"MaskHead: phrase {i} has maps {tuple(m.shape)} but vision features "
                                 f"{tuple(f.shape)}; expected ({self.vision_channels}, {2 * m.shape[-2]}, "
                                 f"{2 * m.shape[-1]}), the features of its own image")
        out = [None] * len(maps)
        run = [i for i in range(len(maps)) if same_as is None or same_as[i] == i]
        for group in same_size_groups([maps[i] for i in run]):
            idx = [run[g] for g in group]
            v = torch.stack([feats[i] for i in idx]) if feats is not None else None
            for i, logit in zip(idx, self._forward_grid(torch.stack([maps[i] for i in idx]), v)):
                out[i] = logit
        return out if same_as is None else [out[j] for j in same_as]

    def channel_weights(self):
        """(in_channels,) float32: the L2 norm of the first convolution's weights over each input channel (channel
        layer*H + head): how strongly the U-Net reads each attention map (every map is normalised to sum 1 first)."""
        return torch.linalg.vector_norm(self.down[0][0].weight.detach().float(), dim=(0, 2, 3))

    def _forward_grid(self, x, v):
        """x (P, C, h, w), v (P, C_vis, 2h, 2w) or None -> (P, token_px*h, token_px*w) logits."""
        P, C, h, w = x.shape
        if C != self.in_channels:
            raise ValueError(f"MaskHead expects {self.in_channels} attention channels (L*H), got {C}")
        x = x.float()
        x = x / x.sum((-2, -1), keepdim=True).clamp_min(1e-12)  # each channel a distribution over image tokens
        hs, ws = max(1, round(h * self.size / max(h, w))), max(1, round(w * self.size / max(h, w)))
        x = F.interpolate(x, size=(hs, ws), mode="bilinear", align_corners=False)  # (P, C, hs, ws), long side `size`
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
        x = self.out(x)[:, 0, :hs, :ws]  # (P, hs, ws): padding cropped off
        return bilinear(x, (self.token_px * h, self.token_px * w))


def load_state(module, state_dict, what):
    """Load weights, failing with the exact missing and unexpected keys (a module built with other kwargs)."""
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise KeyError(f"{what} checkpoint does not fit the module built from its config: missing {missing}, "
                       f"unexpected {unexpected}")
    return module


class Grounder(nn.Module):
    """MaskHead (+ SAM Refiner) (+ phrase Selector): frozen outputs -> dict(coarse=[logits per phrase], refined=[...]
    with a refiner, select=[(A_b, 3) B/I/O logits per sequence] with a selector (reads frozen["answer"])).

    `frozen` is the dict of model.frozen_outputs: maps, phrase_image, vision (per image or None), hidden; with a
    refiner also its image encoder's outputs per image (the keys of refiner.image_shapes: sam_embeddings (B, C, e, e)
    and SAM-HQ's / SAM 2's extra maps) and sam_sizes [(rh, rw)]. Holds only what trains: wrap it
    in DDP as a whole, it is called exactly once per micro-step."""

    def __init__(self, head, refiner=None, selector=None):
        super().__init__()
        self.head, self.refiner, self.selector = head, refiner, selector

    def frozen_parameters(self):
        """The refiner's frozen SAM image encoder (not a registered submodule; counted for the log line)."""
        encoder = self.refiner.vision_encoder if self.refiner is not None else None
        return list(encoder.parameters()) if encoder is not None else []

    def dummy_inputs(self, device):
        """The smallest frozen-outputs dict (one phrase of 1x1 tokens) for a zero-weighted pass (train.idle_backward)."""
        h, r = self.head, self.refiner
        frozen = dict(maps=[torch.zeros(h.in_channels, 1, 1, device=device)], phrase_image=[0], hidden=None,
                      vision=[torch.zeros(h.vision_channels, 2, 2, device=device)] if h.vision_channels else None)
        if r is not None:
            frozen.update(hidden=[torch.zeros(1, r.layer_weights.numel(), r.text_proj.in_features, device=device)],
                          **{k: torch.zeros(1, *shape, device=device) for k, shape in r.image_shapes.items()},
                          sam_sizes=[(r.size, r.size)], **({"vlm_box": [[None]]} if r.box == "vlm" else {}))
        if self.selector is not None:
            frozen["answer"] = [torch.zeros(1, self.selector.layer_weights.numel(), self.selector.norm.normalized_shape[0],
                                            device=device)]
        return frozen

    def forward(self, frozen):
        vision = frozen["vision"]
        feats = None if vision is None else [vision[i] for i in frozen["phrase_image"]]  # each phrase its image's
        out = dict(coarse=self.head(frozen["maps"], feats, frozen.get("same_as")))
        if self.refiner is not None:
            boxes = None if self.refiner.box == "mask" else vlmbox.sam_boxes(
                frozen["vlm_box"], out["coarse"], frozen["phrase_image"], frozen["sam_sizes"])  # the VLM's own
            image = {k: frozen[k] for k in self.refiner.image_shapes}  # the SAM image encoder's outputs
            out["refined"] = self.refiner(out["coarse"], image, frozen["phrase_image"], frozen["hidden"],
                                          frozen["sam_sizes"], boxes)
        if self.selector is not None:
            out["select"] = self.selector(frozen["answer"])
        return out


def bce_dice(logits, masks):
    """Per-phrase BCE-with-logits and Dice: lists of (h, w) logits and {0, 1} masks -> two (P,) float32 tensors."""
    if not logits:
        raise ValueError("bce_dice: no phrases to supervise (every sample carries at least one supervised phrase)")
    for i, (x, m) in enumerate(zip(logits, masks, strict=True)):
        if x.shape != m.shape:
            raise ValueError(f"phrase {i}: logits {tuple(x.shape)} vs mask {tuple(m.shape)}")
    bce, dice, order = [], [], []
    for idx in same_size_groups(logits):  # one stacked batch per image size: a few kernels, not a few per phrase
        x = torch.stack([logits[i] for i in idx]).float().flatten(1)  # (P, h*w)
        m = torch.stack([masks[i] for i in idx]).to(x.device, torch.float32).flatten(1)
        bce.append(F.binary_cross_entropy_with_logits(x, m, reduction="none").mean(1))
        p = x.sigmoid()
        dice.append(1 - (2 * (p * m).sum(1) + 1) / (p.sum(1) + m.sum(1) + 1))  # +1: empty masks are fine
        order += idx
    inverse = torch.argsort(torch.tensor(order))  # back to phrase order
    return torch.cat(bce)[inverse.to(bce[0].device)], torch.cat(dice)[inverse.to(bce[0].device)]


def loss_names(grounder):
    """The names `losses` returns for this grounder (train.py logs them on every rank, also one that had no batch)."""
    return (["bce", "dice"] + (["sam_bce", "sam_dice"] if grounder.refiner is not None else [])
            + (["select"] if grounder.selector is not None else []))


def losses(out, batch):
    """Grounder output + its batch -> {name: (per-item values, unit)}: the per-phrase mask terms of phrase_losses
    with unit "phrase". train.py divides each term's sum by the step's count of its unit (over micro-batches and
    ranks) and adds them up; a term averaged per sequence would come with unit "sequence"."""
    terms = {name: (v, "phrase") for name, v in phrase_losses(out, batch).items()}
    if "select" in out:  # the selector's B/I/O cross-entropy, a mean over each answer's tokens
        terms["select"] = (selection.sequence_losses(out["select"], answer_tags(batch)), "sequence")
    return terms


def answer_tags(batch):
    """A batch -> per sentence (batch then sentence order: a packed sample holds several) the (A,) B/I/O tags of its
    answer tokens, the answer frozen_outputs returns: supervised phrases are the spans."""
    if "frozen" in batch and "answer_mask_ids" in batch["frozen"]:  # cached: one sentence a sample, no token ids
        return [selection.token_tags(m.long(), s) for m, s in zip(batch["frozen"]["answer_mask_ids"],
                                                                    batch["supervised"], strict=True)]
    return [selection.token_tags(m, batch["supervised"][b][first:]) for b, first, m in answer_mask_ids(batch)]


def answer_mask_ids(batch):
    """Per sentence (batch then sentence order) of a batch with token ids: (its sample, the index of its first phrase
    there, its answer's (A,) mask_ids with its phrases numbered from 0) (build.extract caches the last for the
    selector)."""
    host, out = batch.get("host", batch), []
    for b, m in enumerate(host["mask_ids"]):
        seg = host["segment_ids"][b] if "segment_ids" in host else (torch.cumsum(m >= 0, 0) > 0).long()
        for s in range(1, int(seg.max()) + 1):
            own = selection.answer_mask_ids(torch.where(seg == s, m, -1))  # (A,) phrase ids of this sentence
            first = int(own[own >= 0].min())
            out.append((b, first, torch.where(own >= 0, own - first, -1)))
    return out


def sentence_count(batch):
    """Sentences (answers) in a batch: a packed sample holds several, any other one."""
    if "segment_ids" in batch:
        return int(batch.get("host", batch)["segment_ids"].max(1).values.sum())
    return len(batch.get("phrases", []))


def phrase_losses(out, batch):
    """Grounder output + its batch -> dict of (P,) per-phrase terms over the phrases that carry a mask
    (batch["supervised"]): bce, dice on the coarse masks (batch["masks"], at the head's resolution) and, with a
    refiner, sam_bce, sam_dice on the refined ones (batch["sam_masks"], in SAM's frame)."""
    keep = [bool(s) for ss in batch["supervised"] for s in ss]

    def supervised(xs):
        return [x for x, k in zip(xs, keep, strict=True) if k]
    terms = dict(zip(("bce", "dice"), bce_dice(supervised(out["coarse"]),
                                               supervised([m for ms in batch["masks"] for m in ms]))))
    if "refined" in out:
        terms.update(zip(("sam_bce", "sam_dice"), bce_dice(supervised(out["refined"]),
                                                           supervised([m for ms in batch["sam_masks"] for m in ms]))))
    return terms
