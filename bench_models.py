"""The architectures bench.py measures, built with random weights (nothing downloaded): every full-size Qwen VLM
(the text and vision fields of each Hub checkpoint's config.json, `ARCH`) and every SAM (`SAM_ARCH`), plus the
wider tiny Qwen2.5-VL of the CPU runs. The README's size table is computed from these configs on the meta device."""
import os

import torch

import model
import qwen_inputs
import refiner
import synthetic

PHRASES = ["the man in the red shirt", "a white dog on the left", "the bicycle near the wall"]
TEXTS = ["You are a helpful assistant.", qwen_inputs.DEFAULT_PROMPT, *PHRASES] * 20


def dtype_for(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# Full-size architectures (random weights): the text and vision fields of each Hub checkpoint's config.json.
QWEN2_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16)  # Qwen2-VL: hidden_size is the LLM width
QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                     fullatt_block_indexes=[7, 15, 23, 31])
QWEN3_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24])
QWEN3_VISION_SMALL = dict(QWEN3_VISION, depth=24, hidden_size=1024, intermediate_size=4096,
                          deepstack_visual_indexes=[5, 11, 17])  # Qwen3-VL 2B and 4B


def _text(hidden, inter, layers, heads, kv_heads, vocab, **more):
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, vocab_size=vocab, **more)


def _moe(hidden, layers, heads, kv_heads, experts, active, expert_inter):
    return _text(hidden, 6144, layers, heads, kv_heads, 151936, head_dim=128, num_experts=experts,
                 num_experts_per_tok=active, moe_intermediate_size=expert_inter, decoder_sparse_step=1)


ARCH = {  # name: (family, text fields, vision fields, tied word embeddings)
    "qwen2vl_2b": ("qwen2_vl", _text(1536, 8960, 28, 12, 2, 151936), QWEN2_VISION, True),
    "qwen2vl_7b": ("qwen2_vl", _text(3584, 18944, 28, 28, 4, 152064), QWEN2_VISION, False),
    "qwen2vl_72b": ("qwen2_vl", _text(8192, 29568, 80, 64, 8, 152064), QWEN2_VISION, False),
    "3b": ("qwen2_5_vl", _text(2048, 11008, 36, 16, 2, 151936), QWEN25_VISION, True),
    "7b": ("qwen2_5_vl", _text(3584, 18944, 28, 28, 4, 152064), QWEN25_VISION, False),
    "32b": ("qwen2_5_vl", _text(5120, 27648, 64, 40, 8, 152064), QWEN25_VISION, False),
    "72b": ("qwen2_5_vl", _text(8192, 29568, 80, 64, 8, 152064), QWEN25_VISION, False),
    "qwen3vl_2b": ("qwen3_vl", _text(2048, 6144, 28, 16, 8, 151936, head_dim=128), QWEN3_VISION_SMALL, True),
    "qwen3vl_4b": ("qwen3_vl", _text(2560, 9728, 36, 32, 8, 151936, head_dim=128), QWEN3_VISION_SMALL, True),
    "qwen3vl_8b": ("qwen3_vl", _text(4096, 12288, 36, 32, 8, 151936, head_dim=128), QWEN3_VISION, False),
    "qwen3vl_32b": ("qwen3_vl", _text(5120, 25600, 64, 64, 8, 151936, head_dim=128), QWEN3_VISION, False),
    "qwen3vl_30b_a3b": ("qwen3_vl_moe", _moe(2048, 48, 32, 4, 128, 8, 768), QWEN3_VISION, False),
    "qwen3vl_235b_a22b": ("qwen3_vl_moe", _moe(4096, 94, 64, 4, 128, 8, 1536), QWEN3_VISION, False),
}


def arch_config(name, tiny_dir):
    """The config of ARCH[name], its special-token ids taken from the tiny checkpoint of the same family in tiny_dir
    (written by synthetic.build_tiny_qwen, whose tokenizer the benchmark uses)."""
    from transformers import AutoConfig
    family, text, vision, tied = ARCH[name]
    cfg = AutoConfig.from_pretrained(tiny_dir)
    cfg.text_config.update(dict(text, max_position_embeddings=128000))
    cfg.text_config.rope_parameters["mrope_section"] = [24, 20, 20] if family.startswith("qwen3") else [16, 24, 24]
    if hasattr(cfg.text_config, "layer_types"):
        cfg.text_config.layer_types = ["full_attention"] * text["num_hidden_layers"]
    out = "hidden_size" if family == "qwen2_vl" else "out_hidden_size"  # the vision tower's output width
    cfg.vision_config.update({**vision, out: text["hidden_size"]})
    cfg.tie_word_embeddings = tied
    return cfg


def build_model(name, device, workdir):
    """(qwen, tokenizer): a local checkpoint as it is, else random weights: "tiny" (a wider tiny Qwen2.5-VL) or a
    full-size ARCH name. For those the tokenizer is the tiny BPE one of the same family (its image settings too) and
    the config's special-token ids point into it."""
    if os.path.isdir(name):
        return model.load_qwen(name, dtype=dtype_for(device), device=device)
    if name != "tiny" and name not in ARCH:
        raise SystemExit(f"--model {name!r}: not a directory, 'tiny' or one of {sorted(ARCH)}")
    tiny_dir = os.path.join(workdir, "tiny")
    kw = dict(hidden=256, layers=6, heads=8, kv_heads=2, vision_hidden=128, vision_depth=4) if name == "tiny" else {}
    family = "qwen2_5_vl" if name == "tiny" else ARCH[name][0]
    synthetic.build_tiny_qwen(tiny_dir, TEXTS, family=family, seed=0, **kw)
    qwen, tokenizer = model.load_qwen(tiny_dir, dtype=dtype_for(device), device=device)
    if name == "tiny":
        return qwen, tokenizer
    torch.manual_seed(0)
    with device:  # random init directly on the device: minutes faster than on the CPU for 3B/7B
        qwen = model.FAMILIES[family]._from_config(arch_config(name, tiny_dir), dtype=dtype_for(device),
                                                   attn_implementation="sdpa")
    model.use_fast_attention(qwen).requires_grad_(False).eval()
    return qwen, tokenizer


SAM_VIT = {"b": dict(),  # SamVisionConfig's defaults are ViT-B
           "l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                     global_attn_indexes=[5, 11, 17, 23]),
           "h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                     global_attn_indexes=[7, 15, 23, 31])}


def _hiera(dim, heads, blocks, global_blocks, background, windows=(8, 4, 14, 7)):
    """Sam2Config fields of a SAM 2.1 Hiera (the sizes of facebook/sam2.1-hiera-*): stage widths and heads double."""
    return dict(vision_config=dict(backbone_config=dict(
        model_type="sam2_hiera_det_model", hidden_size=dim, num_attention_heads=heads, blocks_per_stage=blocks,
        embed_dim_per_stage=[dim, 2 * dim, 4 * dim, 8 * dim],
        num_attention_heads_per_stage=[heads, 2 * heads, 4 * heads, 8 * heads],
        window_size_per_stage=list(windows), global_attention_blocks=global_blocks,
        window_positional_embedding_background_size=background), backbone_channel_list=[8 * dim, 4 * dim, 2 * dim, dim]))


SAM_ARCH = {  # name: (family, config fields of full-size random weights; None: refiner.tiny_sam_config(family))
    "tiny": ("sam", None), "tiny_sam_hq": ("sam_hq", None), "tiny_sam2": ("sam2", None),
    "tiny_sam3": ("sam3_tracker", None),
    **{f"vit_{k}": ("sam", dict(vision_config=v)) for k, v in SAM_VIT.items()},
    **{f"hq_vit_{k}": ("sam_hq", dict(vision_config=v, mask_decoder_config=dict(vit_dim=v.get("hidden_size", 768))))
       for k, v in SAM_VIT.items()},
    "sam2_t": ("sam2", _hiera(96, 1, [1, 2, 7, 2], [5, 7, 9], [7, 7])),
    "sam2_s": ("sam2", _hiera(96, 1, [1, 2, 11, 2], [7, 10, 13], [7, 7])),
    "sam2_b+": ("sam2", _hiera(112, 2, [2, 3, 16, 3], [12, 16, 20], [14, 14])),
    "sam2_l": ("sam2", _hiera(144, 2, [2, 6, 36, 4], [23, 33, 43], [7, 7], windows=(8, 4, 16, 8))),
    "sam3": ("sam3_tracker", dict()),  # Sam3TrackerConfig's defaults: SAM 3's ViT at 1008
}


def build_sam(name, out_dir):
    """Write SAM_ARCH[name] with random weights (seeded) to out_dir; it loads with refiner.load_sam."""
    family, fields = SAM_ARCH[name]
    if fields is None:
        return refiner.build_tiny_sam(out_dir, family=family)
    torch.manual_seed(0)
    model_class = refiner.FAMILIES[family]
    model_class(model_class.config_class(**fields)).save_pretrained(out_dir)
    return out_dir
