"""F-LMM's second stage: SAM refines the U-Net's coarse mask, prompted by it, its box and the phrase's hidden states.

SAM is transformers' `SamModel` (never remote code). Its image encoder is frozen: eval, no grad, not a registered
submodule, so it is neither trained nor saved; the prompt encoder, the mask decoder, the text projection and the
layer weights train, and the U-Net gets gradient through the dense (mask) prompt.

Frames, as in segment-anything: SAM sees the image resized to `S` (1024; 256 for the tiny SAM) on its long side,
`(rh, rw) = sam_size`, padded bottom/right to `S x S`. Boxes are `(x0, y0, x1, y1)` pixels in that frame, the end
exclusive (F-LMM's `mask2box` gives `x1 + 1`). Refined masks are logits at `(rh, rw)`: compare them with the target
resized to `sam_size`, or resize them to the image.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from transformers import PretrainedConfig, SamConfig, SamModel

import qwen_inputs

SAM_SIZE = 1024  # long side of SAM's input, pixels (ViT-B/L/H)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)  # SamImageProcessor's image_mean / image_std
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# SamImageProcessor's arithmetic per uint8 level (rescale by 1/255 in float64, float32, then (x - mean) / std in
# float32): a table look-up gives the same bits as normalising every pixel, several times faster in a worker.
NORMALISE_LUT = ((np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)[None, :]
                 - IMAGENET_MEAN[:, None]) / IMAGENET_STD[:, None]  # (3, 256)


def sam_image(image, size=SAM_SIZE):
    """PIL image (any mode) -> dict(sam_pixel_values=float32 (3, size, size), sam_size=(rh, rw)).

    Bit-identical to transformers' `SamImageProcessor` (PIL backend) with `size={"longest_edge": size}` and
    `pad_size` `size x size`: RGB (transparency on white), long side to `size` (`int(side * scale + 0.5)`), PIL
    bilinear on uint8, ImageNet mean/std, zeros padded bottom/right. `(rh, rw)` is the resized size before padding.
    An image of a few pixels is upscaled like any other; one whose short side rounds to 0 pixels (aspect ratio above
    2 * size) raises ValueError (transformers raises an unrelated-looking one)."""
    image = qwen_inputs.to_rgb(image)
    w, h = image.size
    scale = size * 1.0 / max(h, w)
    rh, rw = int(h * scale + 0.5), int(w * scale + 0.5)  # SamImageProcessor._get_preprocess_shape
    if rh == 0 or rw == 0:
        raise ValueError(f"a {w}x{h} (WxH) image becomes {rw}x{rh} at SAM's long side {size}: aspect ratio too large")
    rgb = np.asarray(image.resize((rw, rh), Image.BILINEAR))  # (rh, rw, 3) uint8; the processor's resample
    out = np.zeros((3, size, size), np.float32)  # padding is 0 after normalisation, as the processor pads
    for c in range(3):
        out[c, :rh, :rw] = NORMALISE_LUT[c][rgb[..., c]]
    return dict(sam_pixel_values=torch.from_numpy(out), sam_size=(rh, rw))


def tiny_sam_config():
    """A 0.34M-parameter SAM for CPU tests and the demo: image 256, embeddings (64, 16, 16), mask input 64x64.
    num_pos_feats must be half the prompt hidden size, or the box embedding fails with a size mismatch.
    SamVisionConfig's default initializer_range is 1e-10: a random encoder would then embed every image as ~1e-21."""
    return SamConfig(
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=256, patch_size=16,
                           global_attn_indexes=[1], output_channels=64, window_size=4, mlp_dim=128, num_pos_feats=32,
                           initializer_range=0.02),
        prompt_encoder_config=dict(image_size=256, patch_size=16, hidden_size=64),
        mask_decoder_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_dim=128,
                                 iou_head_hidden_dim=64))


def build_tiny_sam(out_dir, seed=0):
    """Write a random tiny `SamModel` (`tiny_sam_config`) to `out_dir`; it loads with `load_sam(out_dir)`."""
    torch.manual_seed(seed)
    sam = SamModel(tiny_sam_config())
    with torch.no_grad():  # transformers draws the Fourier matrix with std hidden/2 (32 here); segment-anything's is
        # std 1: at 32 a box corner's encoding aliases over the frame and a random tiny SAM cannot learn where it is
        sam.shared_image_embedding.positional_embedding.normal_(0, 1)
    sam.save_pretrained(out_dir)
    return out_dir


def load_sam(name_or_path, dtype=torch.float32, device="cuda"):
    """A `SamModel` from a local directory or a Hub id (e.g. facebook/sam-vit-large); never trust_remote_code.
    float32 by default: the prompt encoder and mask decoder train (under autocast)."""
    try:
        config = PretrainedConfig.get_config_dict(name_or_path)[0]  # the raw config.json, local or Hub
    except OSError as e:
        raise FileNotFoundError(f"SAM checkpoint {name_or_path!r}: no such directory, and no Hub repo that can be "
                                f"fetched ({e})") from e
    if config.get("model_type") != "sam":
        raise ValueError(f"{name_or_path!r} is not a SAM checkpoint: its config's model_type is "
                         f"{config.get('model_type')!r}, expected 'sam' (a SamModel, e.g. facebook/sam-vit-large)")
    return SamModel.from_pretrained(name_or_path, dtype=dtype).to(device)


def box_of(coarse, sam_size):
    """Coarse logits (h, w) -> float (4,) box (x0, y0, x1, y1) of `sigmoid(coarse) > 0.5` in the `sam_size`
    (rh, rw) frame, the end exclusive; the whole frame (0, 0, rw, rh) when nothing is above 0.5. No gradient, and no
    host sync (the empty case is a `where`, not an `if`)."""
    h, w = coarse.shape
    rh, rw = sam_size
    fg = coarse.detach() > 0  # sigmoid(x) > 0.5 <=> x > 0
    rows, cols = fg.any(1).int(), fg.any(0).int()  # (h,), (w,)
    # argmax returns the first maximum: the first foreground row; on the flipped rows, the distance from the end
    y0, y1 = rows.argmax(), h - rows.flip(0).argmax()
    x0, x1 = cols.argmax(), w - cols.flip(0).argmax()
    box = torch.stack([x0 * (rw / w), y0 * (rh / h), x1 * (rw / w), y1 * (rh / h)]).float()
    return torch.where(rows.any(), box, torch.tensor([0.0, 0.0, rw, rh], device=box.device))


def mask_prompt(coarse, sam_size, size, mask_size):
    """Coarse logits (h, w) -> SAM's mask input (1, 1, mask_size, mask_size), F-LMM's way: bilinear to the
    `sam_size` frame, padded to `size x size` with min(-1, coarse.min()) (background: the padding holds no object),
    bilinear to `mask_size`. Not detached: the refined-mask loss trains the U-Net through it. The pad value is this
    phrase's own (F-LMM takes the min over the image's phrases), so a phrase's result does not depend on its
    batch-mates."""
    rh, rw = sam_size
    x = F.interpolate(coarse[None, None].float(), size=(rh, rw), mode="bilinear", align_corners=False)  # (1, 1, rh, rw)
    canvas = coarse.detach().float().min().clamp(max=-1.0).expand(1, 1, size, size).clone()  # (1, 1, S, S)
    canvas[..., :rh, :rw] = x
    return F.interpolate(canvas, size=(mask_size, mask_size), mode="bilinear", align_corners=False)


class Refiner(nn.Module):
    """SAM's prompt encoder and mask decoder, prompted per phrase by its coarse mask (dense), the box of that mask
    and its tokens' hidden states (one sparse token each), over the frozen image encoder's embeddings."""

    def __init__(self, sam, *, hidden_size, text_layers, box="mask", detach_mask=False, encoder=True):
        """sam: a `SamModel` (its parts are taken, not copied); hidden_size: the VLM's; text_layers: how many of
        its last decoder layers give the phrase tokens' hidden states; box: "mask" (each phrase's coarse-mask box,
        F-LMM) or "vlm" (boxes given to forward); detach_mask: the dense prompt gets the coarse logits detached, so
        the refined loss does not reach the U-Net; encoder=False: SAM's image encoder is dropped (training from
        cached image embeddings never runs it; image_embeddings then raises)."""
        super().__init__()
        self.box, self.detach_mask = box, detach_mask
        # Frozen and outside the module tree: state_dict, parameters(), train() and DDP never see it (`_apply` below
        # still moves it with .to()); this is also why it is never saved with the trainable parts.
        object.__setattr__(self, "vision_encoder", sam.vision_encoder.requires_grad_(False).eval() if encoder else None)
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        # Frozen, as in segment-anything where the random Fourier matrix is a buffer (transformers: a Parameter).
        # The prompt encoder shares it with SamModel.shared_image_embedding, so the decoder's image-wide positional
        # embedding (1, C, e, e) is a constant too.
        self.prompt_encoder.shared_embedding.requires_grad_(False)
        self.register_buffer("image_pe", sam.get_image_wide_positional_embeddings().detach(), persistent=False)
        # Never in the graph with a box + mask prompt and one output mask (points, "no mask", the IoU head):
        # frozen so that DDP needs no find_unused_parameters.
        for unused in (*self.prompt_encoder.point_embed[:2], self.prompt_encoder.not_a_point_embed,
                       self.prompt_encoder.no_mask_embed, self.mask_decoder.iou_prediction_head):
            unused.requires_grad_(False)
        self.size = sam.config.vision_config.image_size  # S: 1024 for ViT-B/L/H
        self.mask_size = 4 * sam.config.prompt_encoder_config.image_embedding_size  # 256 (4x the embedding grid)
        self.text_proj = nn.Linear(hidden_size, sam.config.prompt_encoder_config.hidden_size)
        self.layer_weights = nn.Parameter(torch.zeros(text_layers))  # logits of the layer mix: uniform at start

    def _apply(self, fn, recurse=True):
        if self.vision_encoder is not None:
            self.vision_encoder._apply(fn, recurse)  # unregistered, but it must follow .to(device) / .cuda()
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def image_embeddings(self, sam_pixel_values):
        """float (B, 3, S, S) from `sam_image` -> (B, C, S/16, S/16), frozen. Once per image: its phrases share it."""
        if self.vision_encoder is None:
            raise RuntimeError("this Refiner was built without SAM's image encoder (encoder=False: for cached image "
                               "embeddings); build it with encoder=True to embed images")
        if sam_pixel_values.shape[1:] != (3, self.size, self.size):
            raise ValueError(f"sam_pixel_values: expected (B, 3, {self.size}, {self.size}) for this SAM, got "
                             f"{tuple(sam_pixel_values.shape)}; build them with sam_image(image, size={self.size})")
        dtype = self.vision_encoder.patch_embed.projection.weight.dtype
        return self.vision_encoder(sam_pixel_values.to(dtype)).last_hidden_state

    def forward(self, coarse, embeddings, phrase_image, hidden, sam_sizes, boxes=None):
        """Refine every phrase of a batch.

        coarse: list of N float (h_k, w_k) U-Net logits, each over its whole image (any resolution, same aspect);
        embeddings: (B, C, e, e) from `image_embeddings`; phrase_image: N ints, the image of each phrase;
        hidden: list of N float (T_k, text_layers, hidden_size), the phrase tokens' hidden states (last layers);
        sam_sizes: B (rh, rw) from `sam_image`; boxes: None (each phrase's coarse-mask box, F-LMM) or N float (4,)
        box prompts (x0, y0, x1, y1) in its `sam_sizes` frame (vlmbox.sam_boxes). Returns a list of N float (rh, rw)
        refined logits.

        The prompt encoder runs once for all phrases; the mask decoder once per distinct token count T_k. SAM has no
        padding mask for sparse tokens (its token self-attention and image-to-token attention would see the padding),
        so phrases are grouped by length instead of padded: exact, and the batch's lengths are few."""
        sizes = [sam_sizes[i] for i in phrase_image]  # (rh, rw) of each phrase's image
        dense_in = [c.detach() for c in coarse] if self.detach_mask else coarse  # detached: the U-Net's own loss only
        masks = torch.cat([mask_prompt(c, s, self.size, self.mask_size) for c, s in zip(dense_in, sizes)])  # (N,1,m,m)
        if boxes is None:
            boxes = torch.stack([box_of(c, s) for c, s in zip(coarse, sizes)])
        boxes = boxes[:, None]  # (N, 1, 4)
        sparse, dense = self.prompt_encoder(input_points=None, input_labels=None, input_boxes=boxes, input_masks=masks)
        # sparse (N, 1, 2, C): the box corners; dense (N, C, e, e)
        tokens = torch.cat(hidden)  # (sum T_k, L, D)
        if tokens.shape[1:] != (len(self.layer_weights), self.text_proj.in_features):
            raise ValueError(f"hidden: expected (T, {len(self.layer_weights)}, {self.text_proj.in_features}) per "
                             f"phrase (text_layers, hidden_size), got {tuple(tokens.shape[1:])}")
        mix = self.layer_weights.softmax(0)  # (L,)
        text = self.text_proj((tokens.to(mix.dtype) * mix[:, None]).sum(1))  # (sum T_k, C)
        lengths = [len(h) for h in hidden]
        text = text.split(lengths)  # N x (T_k, C)
        image_of = torch.as_tensor(phrase_image, device=embeddings.device)
        refined = [None] * len(coarse)
        for length in sorted(set(lengths)):
            group = [k for k, t in enumerate(lengths) if t == length]
            index = torch.as_tensor(group, device=embeddings.device)
            prompts = torch.cat([sparse[index], torch.stack([text[k] for k in group])[:, None]], dim=2)  # (n,1,2+T,C)
            # Each phrase has its own dense prompt, so each is its own batch row with its image's embeddings
            # (point_batch > 1 would share one dense prompt among the points of a row).
            low_res, _ = self.mask_decoder(embeddings[image_of[index]], self.image_pe, prompts, dense[index],
                                           multimask_output=False)  # (n, 1, 1, m, m)
            up = F.interpolate(low_res[:, 0], size=(self.size, self.size), mode="bilinear", align_corners=False)
            for j, k in enumerate(group):
                rh, rw = sizes[k]
                refined[k] = up[j, 0, :rh, :rw]  # the padding is not the image
        return refined
