"""The frozen Qwen VLM and what one forward of it yields: phrase->image attention, vision features, hidden states.

frozen_outputs runs one forward of the frozen VLM on PyTorch SDPA (flash / cuDNN / memory-efficient kernels on
CUDA; never an S x S map) and returns, per phrase, the softmax attention from its tokens to the image tokens in
every layer and head (F-LMM, CVPR 2025), plus what the mask head and the SAM refiner read (head.py trains on them);
the attention functions that record those rows are in capture.py.
Families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE (load_qwen picks the class by the checkpoint's model_type);
shard=True spreads a model too large for one GPU over the ranks of a torchrun job with FSDP2 (shard_qwen).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import (AutoTokenizer, PretrainedConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2VLForConditionalGeneration, Qwen3VLForConditionalGeneration,
                          Qwen3VLMoeForConditionalGeneration)
from transformers.vision_utils import get_vision_window_index

import qwen_inputs
from capture import CAPTURE_ATTENTION, VISION_ATTENTION, PhraseCapture

MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
DEVICE_KEYS = MODEL_INPUTS + ("masks", "sam_pixel_values", "sam_masks")  # what a training step reads on the device
HOST_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "mask_ids")  # CPU-side indices
PACKED_KEYS = ("segment_ids",)  # a packed batch's (qwen_inputs.build_packed): on the device and on the host
# the checkpoint's config.json model_type -> its class (all in transformers itself: no remote code)
FAMILIES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
            "qwen3_vl": Qwen3VLForConditionalGeneration, "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration}


def load_qwen(name_or_path, dtype=torch.bfloat16, device="cuda", shard=False):
    """A frozen Qwen VLM (eval, no grad, `use_fast_attention`) and its tokenizer, from a local directory or a Hub id;
    the class is chosen by the checkpoint's model_type (FAMILIES). Never trust_remote_code: everything used is in
    transformers itself. The tokenizer carries `tokenizer.image_settings`: the checkpoint's own patchify keyword
    arguments (qwen_inputs.image_settings). shard=True (inside an initialised torchrun process group): every rank
    holds 1/world of the weights on `device` (shard_qwen); the ranks read the checkpoint one after another, so the
    host needs the memory of one full copy at a time."""
    model_type = PretrainedConfig.get_config_dict(name_or_path)[0].get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{name_or_path}: model_type {model_type!r} is not a supported Qwen VLM; supported: "
                         f"{sorted(FAMILIES)}")
    if shard and not dist.is_initialized():
        raise ValueError("load_qwen(shard=True) needs the torchrun process group (build.init_distributed) first")
    for turn in range(dist.get_world_size() if shard else 1):
        if not shard or turn == dist.get_rank():
            qwen = FAMILIES[model_type].from_pretrained(name_or_path, dtype=dtype)
            use_fast_attention(qwen).requires_grad_(False).eval()
            if shard:
                shard_qwen(qwen, device)
            else:
                qwen.to(device)
        if shard:
            dist.barrier()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    tokenizer.image_settings = qwen_inputs.image_settings(name_or_path)
    return qwen, tokenizer


def shard_qwen(qwen, device):
    """FSDP2 over all ranks of the process group, in place, shards on `device` (the rank's current GPU): every
    vision block, the vision tower (patch embedding, mergers), every decoder layer are units whose weights are
    all-gathered just before their forward and freed after it; the root keeps the rest (embeddings, final norm,
    lm_head: one unit, as tied embeddings must be) gathered after its first forward. Each rank keeps its own batch
    and sees every head (unlike tensor parallelism). Every forward goes through the root `qwen` (frozen_outputs does):
    FSDP2 makes the first unit called the root, after which calling `qwen` fails. Every rank must run the same
    number of forwards (each all-gathers with the others): `qwen.generate(..., synced_gpus=True)`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    device = torch.device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = [*qwen.model.visual.blocks, qwen.model.visual, *qwen.model.language_model.layers, qwen]
    for unit in units:  # inner units first, as fully_shard requires
        fully_shard(unit, mesh=mesh)
    return qwen


def sharded(qwen):
    """Whether the frozen VLM is spread over the ranks (shard_qwen), so that every rank must join every forward."""
    return qwen is not None and dist.is_initialized() and any(type(p).__name__ == "DTensor" for p in qwen.parameters())


@torch.no_grad()
def generate(qwen, tokenizer, prompts, *, max_new_tokens=64, special=False, **sampling):
    """Prompts laid out up to the assistant turn (qwen_inputs.prompt_ids: input_ids, mm_token_type_ids, with their
    pixel_values and image_grid_thw (1, 3)) -> the VLM's answers (str), one batched, left-padded `qwen.generate` (every
    answer starts at the same position). Greedy unless sampling (transformers' do_sample, temperature, top_p, top_k).
    Each answer ends at its <|im_end|>; special: keep the special tokens inside it (Qwen2-VL's box tokens)."""
    S = max(len(p[0]) for p in prompts)
    pad, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))

    def left(i, value):
        return torch.stack([F.pad(p[i], (S - len(p[i]), 0), value=value) for p in prompts]).to(qwen.device)
    inputs = dict(input_ids=left(0, pad), mm_token_type_ids=left(1, 0),
                  attention_mask=torch.stack([torch.arange(S) >= S - len(p[0]) for p in prompts]).long().to(qwen.device),
                  pixel_values=torch.cat([p[2] for p in prompts]).to(qwen.device, qwen.dtype),
                  image_grid_thw=torch.cat([torch.as_tensor(p[3]).reshape(1, 3) for p in prompts]).to(qwen.device))
    out = qwen.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=end,
                        synced_gpus=sharded(qwen), **sampling)
    texts = []
    for seq in out[:, S:].tolist():
        stop = next((i for i, t in enumerate(seq) if t in (pad, end)), len(seq))
        texts.append(tokenizer.decode(seq[:stop], skip_special_tokens=not special).strip())
    return texts


def use_fast_attention(qwen):
    """Text layers on SDPA with phrase capture, vision blocks on one padded SDPA call per block. Without a
    PhraseCapture the model computes exactly what stock SDPA computes (chat and generate are unaffected)."""
    qwen.set_attn_implementation({"text_config": CAPTURE_ATTENTION, "vision_config": VISION_ATTENTION})
    return qwen


def vision_channels(config):
    """Channels of the vision features frozen_outputs returns (the merger's input): Qwen2-VL calls them embed_dim
    (its vision hidden_size is the LLM width), the other families hidden_size."""
    vision = config.vision_config
    return vision.embed_dim if config.model_type == "qwen2_vl" else vision.hidden_size


def _first_positions(flags):
    """(B, S) bool -> positions (B, M) of the True entries, left-aligned, and valid (B, M); M = max count.
    Padding slots point at position 0 and are False in `valid`."""
    count = flags.sum(1)
    order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True)  # True entries first, in sequence order
    valid = torch.arange(int(count.max()), device=flags.device) < count[:, None]
    return order[:, :valid.shape[1]].masked_fill(~valid, 0), valid


def _raster_features(x, grid, visual, windowed):
    """Merger input (num_patches, C_vis) -> one float32 (C_vis, gh, gw) per image.

    The rows are 2x2 merge blocks in raster order (as patchify writes them), except in Qwen2.5-VL (`windowed`), whose
    tower permutes the blocks into window order before its blocks and un-permutes only after the merger; there the
    same index is recomputed with transformers' own function and inverted."""
    unit = visual.spatial_merge_size ** 2
    x = x.view(-1, unit, x.shape[-1])  # (blocks, 4, C)
    if windowed:
        window_index, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        x = x[torch.argsort(window_index).to(x.device)]  # back to merge-block (raster) order
    feats, start = [], 0
    for t, gh, gw in grid.tolist():
        n = t * gh * gw // unit
        f = x[start:start + n].view(gh // 2, gw // 2, 2, 2, -1)  # blocks in raster order, 2x2 patches inside
        feats.append(f.permute(4, 0, 2, 1, 3).reshape(-1, gh, gw).float())  # (C_vis, gh, gw)
        start += n
    return feats


def _answers(mask_ids, seg):
    """Each sentence's answer tokens (its first through its last phrase token, separators included), sentences in
    batch then segment order: (N,) the sample of each, (N, A) their positions, left-aligned, and valid (N, A)."""
    sample = torch.repeat_interleave(torch.arange(len(seg)), seg.max(1).values)  # (N,)
    sentence = torch.cat([torch.arange(1, int(n) + 1) for n in seg.max(1).values])  # (N,) its segment number
    own = seg[sample] == sentence[:, None]  # (N, S)
    phrase = own & (mask_ids[sample] >= 0)
    pos = torch.arange(seg.shape[1]).expand_as(own)
    first = pos.masked_fill(~phrase, seg.shape[1]).min(1, keepdim=True).values
    last = pos.masked_fill(~phrase, -1).max(1, keepdim=True).values
    positions, valid = _first_positions(own & (pos >= first) & (pos <= last))
    return sample, positions, valid


def packed_mask(segment_ids, attention_mask):
    """(B, S) segment ids and padding mask -> (B, 1, S, S) bool: causal, no padding key, and a key in the shared
    prefix (segment 0) or in the query's own sentence: no sentence sees another one."""
    S = segment_ids.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=segment_ids.device).tril()
    keys = segment_ids[:, None, :]  # (B, 1, S)
    same = (keys == 0) | (keys == segment_ids[:, :, None])  # (B, S, S)
    return (causal & same & attention_mask.bool()[:, None, :])[:, None]


def packed_positions(qwen, host):
    """M-RoPE position ids (3, B, S) of a packed batch (CPU tensors input_ids, mm_token_type_ids, attention_mask,
    image_grid_thw, segment_ids): the family's own get_rope_index of the packed rows, with every sentence shifted back
    to start right after the prefix, as if it were the only one. Text after the image advances by one per token in
    all three rows (Qwen3-VL's interleaved sections included), so a shift per sentence is exact."""
    seg = host["segment_ids"]
    B, S = seg.shape
    position_ids, _ = qwen.model.get_rope_index(host["input_ids"], mm_token_type_ids=host["mm_token_type_ids"],
                                                image_grid_thw=host["image_grid_thw"],
                                                attention_mask=host["attention_mask"])
    index = torch.arange(S).expand(B, S)
    start = torch.full((B, int(seg.max()) + 1), S).scatter_reduce(1, seg, index, "amin")  # first index per segment
    shift = torch.where(seg > 0, start.gather(1, seg) - start[:, 1:2], 0)  # (B, S)
    return position_ids - shift[None].to(position_ids.dtype)


def to_device(batch, device, keys=DEVICE_KEYS):
    """Move a collated batch to `device` once per step (non_blocking from pinned memory): the tensors (and lists of
    tensors) named in `keys`, and a cached batch's "frozen" outputs. The CPU originals of the index tensors stay
    under batch["host"], so that frozen_outputs builds its indices without a host sync."""
    def move(v):  # a tensor, a list of them, or a dict of those (a cached batch's "frozen" outputs)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, list):
            return [move(x) for x in v]
        return v.to(device, non_blocking=True) if torch.is_tensor(v) else v
    out = dict(batch, host={k: batch[k] for k in HOST_KEYS + PACKED_KEYS if k in batch})
    out.update({k: move(batch[k]) for k in keys + PACKED_KEYS + ("frozen",) if k in batch})
    return out


@torch.no_grad()
def frozen_outputs(qwen, batch, *, vision=False, hidden_layers=0, answer_layers=0):
    """One frozen forward -> everything the trainable part reads, as a dict:

    maps: one float32 (L*H, gh/2, gw/2) per phrase, batch then phrase order. Channel `layer*H + head` holds the
        softmax attention probability (over all keys, causal and padding masked, as eager attention computes it)
        from the phrase's tokens to each image token, averaged over the phrase's tokens, not renormalised; image
        tokens in raster order over (gh/2, gw/2).
    phrase_image: the batch index of each phrase's image (list of int).
    vision: with vision=True, the vision tower's last-block patch features (before the 2x2 merger), one float32
        (C_vis, gh, gw) per image (C_vis = vision_channels(qwen.config)); else None.
    hidden: with hidden_layers=n > 0, the outputs of the last n decoder layers at each phrase's tokens, one
        (tokens, n, C) tensor per phrase in the model's dtype (the refiner's text prompt); else None.
    answer: with answer_layers=n > 0, the same outputs at every token of each sentence's answer (its first through
        its last phrase token, separators included: the assistant turn as build_inputs lays it out), one (A, n, C)
        tensor per sentence (a sample is one sentence unless packed; the phrase selector's input); else None.

    `batch` is a `qwen_inputs.collate` batch (right-padded, `mask_ids` k on phrase k's tokens), its model inputs
    on the model's device (`to_device`). Needs the attention set by `use_fast_attention` (load_qwen does it).
    Packed samples (`qwen_inputs.build_packed`: segment_ids) run with a 4-D mask (a sentence sees the shared prefix
    and itself) and per-sentence positions (`packed_positions`): each sentence's maps, hidden and answer states are
    what its own one-sentence sequence gives, the vision tower runs once per row; `answer` is then per sentence.
    """
    if qwen.config.text_config._attn_implementation != CAPTURE_ATTENTION:
        raise ValueError(f"frozen_outputs: the text attention is {qwen.config.text_config._attn_implementation!r}; "
                         f"call model.use_fast_attention(qwen) (load_qwen does) so that it is {CAPTURE_ATTENTION!r}")
    # All index bookkeeping happens on CPU copies (to_device keeps them in batch["host"]): on the GPU every
    # .max()/.any() below would be a host sync inside the training step. Only the small index tensors travel.
    host = {k: v.cpu() for k, v in batch.get("host", batch).items() if k in HOST_KEYS + PACKED_KEYS}
    vis_cfg = qwen.config.vision_config
    qwen_inputs.check_inputs(dict(host, pixel_values=batch["pixel_values"]), qwen.config.image_token_id,
                             vis_cfg.in_channels * vis_cfg.temporal_patch_size * vis_cfg.patch_size ** 2)
    device = qwen.device
    if batch["input_ids"].device != device:
        raise ValueError(f"frozen_outputs: the batch is on {batch['input_ids'].device}, the model on {device}; "
                         f"move it once per step with model.to_device(batch, device)")
    mask_ids = host["mask_ids"]
    no_phrase = ~(mask_ids >= 0).any(1)
    if no_phrase.any():
        raise ValueError(f"frozen_outputs: samples {no_phrase.nonzero().flatten().tolist()} have no phrase tokens")
    # causal: nothing after the batch's last phrase token changes any phrase row, so it is not fed
    S = int((mask_ids >= 0).nonzero()[:, 1].max()) + 1
    mask_ids = mask_ids[:, :S]
    packed = "segment_ids" in host
    # sentence of each token: 0 on the shared prefix; unpacked, a sample is one sentence from its first phrase token
    seg = host["segment_ids"][:, :S] if packed else (torch.cumsum(mask_ids >= 0, 1) > 0).long()  # (B, S)
    rows, row_valid = _first_positions(mask_ids >= 0)  # (B, R) positions of phrase tokens
    row_phrase = mask_ids.gather(1, rows).masked_fill(~row_valid, -1)  # (B, R) phrase index of each row
    num_phrases = mask_ids.max(1).values + 1  # (B,)
    onehot = (row_phrase[:, None, :] == torch.arange(int(num_phrases.max()))[:, None]).float()
    tokens = onehot.sum(-1)  # (B, P) tokens per phrase
    empty = (tokens == 0) & (torch.arange(tokens.shape[1]) < num_phrases[:, None])
    if empty.any():
        raise ValueError(f"frozen_outputs: (sample, phrase) {empty.nonzero().tolist()} have no tokens in mask_ids")
    avg = onehot / tokens.clamp(min=1)[..., None]  # (B, P, R) averaging matrix: the phrase mean is one einsum
    cols, _ = _first_positions(host["mm_token_type_ids"][:, :S] == 1)  # (B, N) image token positions, raster order
    # each phrase row sees the keys before it that are in the prefix or in its own sentence (and not padding)
    keys_ok = ((torch.arange(S) <= rows[..., None]) & host["attention_mask"][:, :S].bool()[:, None]
               & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg.gather(1, rows)[..., None])))  # (B, R, S)
    answer_row, answer_pos, answer_valid = _answers(mask_ids, seg)  # (N,), (N, A): each sentence's answer tokens
    gpu_rows, avg, cols, keys_ok, answer_row, answer_pos = (t.to(device, non_blocking=True) for t in (
        rows, avg, cols, keys_ok, answer_row, answer_pos))
    inputs = dict(input_ids=batch["input_ids"][:, :S], attention_mask=batch["attention_mask"][:, :S],
                  mm_token_type_ids=batch["mm_token_type_ids"][:, :S], pixel_values=batch["pixel_values"],
                  image_grid_thw=batch["image_grid_thw"])
    if packed:  # a 4-D mask (transformers passes it through as it is) and each sentence's own positions
        inputs["attention_mask"] = packed_mask(batch["segment_ids"][:, :S], inputs["attention_mask"])
        inputs["position_ids"] = packed_positions(qwen, {k: v[:, :S] if v.dim() == 2 and k != "image_grid_thw" else v
                                                         for k, v in host.items()}).to(device, non_blocking=True)

    capture, vis, hidden, answer, handles = PhraseCapture(gpu_rows, avg, cols, keys_ok), [], [], [], []
    if vision:  # the merger's input: (num_patches, C_vis) after the last block, in window order
        handles.append(qwen.model.visual.merger.register_forward_pre_hook(lambda merger, args: vis.append(args[0])))
    for layer in qwen.model.language_model.layers[len(qwen.model.language_model.layers) - hidden_layers:]:
        # the layer's output at the phrase rows only: (B, R, C), never the whole (B, S, C) stack of every layer
        handles.append(layer.register_forward_hook(
            lambda module, args, out: hidden.append(out.gather(1, gpu_rows[..., None].expand(-1, -1, out.shape[-1])))))
    for layer in qwen.model.language_model.layers[len(qwen.model.language_model.layers) - answer_layers:]:
        handles.append(layer.register_forward_hook(  # (N, A, C) at each sentence's answer tokens
            lambda module, args, out: answer.append(out[answer_row[:, None], answer_pos])))
    try:  # through the root (a sharded model's FSDP root), with the vocabulary projection of one position only
        qwen(**inputs, use_cache=False, logits_to_keep=1, phrase_capture=capture)
    finally:
        for handle in handles:
            handle.remove()

    layers = len(capture.maps)  # one per decoder layer
    B, P, H, N = capture.maps[0].shape
    stack = torch.stack(capture.maps, 2).view(B, P, layers * H, N)  # (B, P, L*H, N), channel layer*H + head
    maps, phrase_image = [], []
    for b, ((_, gh, gw), k) in enumerate(zip(host["image_grid_thw"].tolist(), num_phrases.tolist())):
        maps += [stack[b, p, :, :gh * gw // 4].reshape(-1, gh // 2, gw // 2) for p in range(k)]  # (L*H, gh/2, gw/2)
        phrase_image += [b] * k
    out = dict(maps=maps, phrase_image=phrase_image, vision=None, hidden=None, answer=None)
    if vision:
        out["vision"] = _raster_features(vis[0], host["image_grid_thw"], qwen.model.visual,
                                         windowed=qwen.config.model_type == "qwen2_5_vl")
    if hidden_layers:
        rows_hidden = torch.stack(hidden, 2)  # (B, R, n, C)
        out["hidden"] = [rows_hidden[b, (row_phrase[b] == p).nonzero().flatten().to(device)]  # (tokens, n, C)
                         for b, k in enumerate(num_phrases.tolist()) for p in range(k)]
    if answer_layers:
        stacked = torch.stack(answer, 2)  # (N, A, n, C)
        out["answer"] = [stacked[i, :n] for i, n in enumerate(answer_valid.sum(1).tolist())]  # (A_i, n, C)
    return out


def phrase_attention(qwen, batch):
    """Frozen forward -> one float32 (L*H, gh/2, gw/2) map per phrase, batch then phrase order (see frozen_outputs)."""
    return frozen_outputs(qwen, batch)["maps"]
