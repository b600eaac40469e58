"""The attention functions the frozen VLM runs on, registered with transformers' public AttentionInterface when this
file is imported (model.py imports it; model.use_fast_attention selects them per sub-config). Text layers run SDPA
for their output and, when model.frozen_outputs passes a PhraseCapture, also record the softmax attention from the
phrase tokens' rows to the image tokens (float32, against all keys, as eager attention normalises), recomputed from
the post-RoPE q and k the layer receives; vision blocks run every window or image of a block as one padded SDPA call.
Neither builds an S x S map, and without a PhraseCapture the text layers compute exactly what stock SDPA computes."""
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# Two attention functions, registered with transformers' public AttentionInterface and selected per sub-config
# by model.use_fast_attention. Both compute the model's output with PyTorch SDPA; neither builds an S x S map.
CAPTURE_ATTENTION = "sdpa_phrase_capture"  # text: SDPA, plus the phrase rows when frozen_outputs asks for them
# Vision: transformers passes a whole block's windows (Qwen2.5-VL) or images (Qwen2-VL, Qwen3-VL) as one packed
# sequence with cu_seqlens only to implementations whose name contains "flash"; stock SDPA instead loops over every
# window or image in Python (30 windows per 640x480 image in each of Qwen2.5-VL's 32 blocks), which dominates a
# batched forward on a GPU.
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
    """SDPA for the layer output; with a PhraseCapture (passed by frozen_outputs as a forward kwarg, which
    transformers hands to every attention call) also the phrase rows of the attention probabilities."""
    out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if phrase_capture is not None:
        phrase_capture.record(query, key, module.scaling if scaling is None else scaling)
    return out


def varlen_vision_attention(module, query, key, value, attention_mask=None, scaling=None, cu_seq_lens_q=None,
                            max_length_q=None, **kwargs):
    """Non-causal attention within each packed sequence of cu_seq_lens_q (Qwen2.5-VL's windows, or whole images in
    its full-attention blocks and in every block of Qwen2-VL and Qwen3-VL) as one padded SDPA call.
    query/key/value (1, heads, T, D) ->
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
