"""F-LMM's second stage: SAM refines the U-Net's coarse mask, prompted by it, its box and the phrase's hidden states.

The SAM is a transformers model (never remote code) of one of four families, picked by its config's model_type:
  sam           SamModel (facebook/sam-vit-base/large/huge): ViT image encoder, prompt encoder, two-way mask decoder.
  sam_hq        SamHQModel (syscv-community/sam-hq-vit-*): SAM plus an HQ output token whose mask also reads the ViT's
                first global-attention block (`sam_intermediate`); the refined mask is SAM's + the HQ mask.
  sam2          Sam2Model (facebook/sam2.1-hiera-tiny/small/base-plus/large): Hiera + FPN image encoder; the decoder
                also reads two high-resolution maps (`sam_feat_s0`, `sam_feat_s1`) and an object-score token.
  sam3_tracker  Sam3TrackerModel: SAM 3's ViT (S = 1008, patch 14) with SAM 2's prompt encoder and mask decoder.
The image encoder is frozen: eval, no grad, not a registered submodule, so it is neither trained nor saved; its
outputs per image (`image_embeddings`: the keys of `image_shapes`) are what build.extract computes once per image
and cache.py stores. The prompt encoder, the mask decoder, the text projection and the layer weights train, and the
U-Net gets gradient through the dense (mask) prompt. SAM 2's conv_s0/conv_s1 belong to its decoder but run on the
encoder's maps (transformers' get_image_features applies them): frozen, so their outputs can be cached.

Frames: SAM and SAM-HQ see the image resized to `S` (1024; 256 for the tiny SAM) on its long side, `(rh, rw) =
sam_size`, padded bottom/right to `S x S` (segment-anything's ResizeLongestSide). SAM 2 and SAM 3 see the whole
image resized to `S x S` (aspect not kept, no padding): `sam_size = (S, S)`. Boxes are `(x0, y0, x1, y1)` pixels in
that frame, the end exclusive (F-LMM's `mask2box` gives `x1 + 1`). Refined masks are logits at `sam_size`: compare
them with the target resized to `sam_size`, or resize them to the image.
"""
import functools

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from transformers import (PretrainedConfig, Sam2Config, Sam2Model, Sam3TrackerConfig, Sam3TrackerModel, SamConfig,
                          SamHQConfig, SamHQModel, SamModel)

import qwen_inputs

SAM_SIZE = 1024  # long side of SAM's input, pixels (SAM, SAM-HQ, SAM 2; SAM 3 takes 1008)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SAM, SAM-HQ and SAM 2's processors
HALF = (0.5, 0.5, 0.5)  # SAM 3's processor: mean and std
FAMILIES = {"sam": SamModel, "sam_hq": SamHQModel, "sam2": Sam2Model, "sam3_tracker": Sam3TrackerModel}
SQUARE = ("sam2", "sam3_tracker")  # resized to S x S; the others keep the aspect ratio and pad


@functools.lru_cache(maxsize=8)
def _fused_lut(mean, std):
    """(3, 256) float32: every uint8 level as the torchvision-backend processors (Sam2ImageProcessor,
    Sam3ImageProcessor) normalise it: rescale and normalise fused into (x - mean * 255) / (std * 255) in float32,
    the factors computed as they compute them (TorchvisionBackend._fuse_mean_std_and_rescale_factor)."""
    factor = 1.0 / (1 / 255)  # 1 / rescale_factor
    mean, std = torch.tensor(list(mean)) * factor, torch.tensor(list(std)) * factor
    return ((torch.arange(256, dtype=torch.float32)[None] - mean[:, None]) / std[:, None]).numpy()


def sam_image(image, size=SAM_SIZE, *, square=False, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD):
    """PIL image (any mode) -> dict(sam_pixel_values=float32 (3, size, size), sam_size=(rh, rw)).

    `Refiner.image_settings` holds the keyword arguments for its family. Both ways composite transparency on white.
    square=False (SAM, SAM-HQ): bit-identical to `SamImageProcessorPil` with `size={"longest_edge": size}` and
    `pad_size` `size x size`: long side to `size` (`int(side * scale + 0.5)`), PIL bilinear on uint8, rescale 1/255
    in float64, then float32 (x - mean) / std, zeros padded bottom/right; `(rh, rw)` is the size before padding. An
    image whose short side rounds to 0 pixels (aspect ratio above 2 * size) raises ValueError (transformers raises
    an unrelated-looking one).
    square=True (SAM 2, SAM 3): what `Sam2ImageProcessor` / `Sam3ImageProcessor` (torchvision backend only) compute
    on a CPU with AVX2, AVX512 or ARM: the uint8 image resized to `size x size` by torch's native uint8 bilinear
    with antialias (skipped when the size is unchanged), then `_fused_lut`; `(rh, rw) = (size, size)`. (On other
    CPUs torchvision resizes in float32 and rounds: up to one level apart on some pixels.)"""
    image = qwen_inputs.to_rgb(image)
    w, h = image.size
    out = np.zeros((3, size, size), np.float32)  # padding is 0 after normalisation, as the processor pads
    if square:
        rh, rw = size, size
        rgb = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].contiguous()  # (1, 3, h, w) uint8
        if (h, w) != (size, size):  # torchvision returns the image itself then
            rgb = F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        rgb = rgb[0].permute(1, 2, 0).numpy()  # (size, size, 3) uint8
        lut = _fused_lut(tuple(image_mean), tuple(image_std))
    else:
        scale = size * 1.0 / max(h, w)
        rh, rw = int(h * scale + 0.5), int(w * scale + 0.5)  # SamImageProcessor._get_preprocess_shape
        if rh == 0 or rw == 0:
            raise ValueError(f"a {w}x{h} (WxH) image becomes {rw}x{rh} at SAM's long side {size}: aspect ratio too "
                             f"large")
        rgb = np.asarray(image.resize((rw, rh), Image.BILINEAR))  # (rh, rw, 3) uint8; the processor's resample
        lut = qwen_inputs.normalise_lut(tuple(image_mean), tuple(image_std))
    for c in range(3):
        out[c, :rh, :rw] = lut[c][rgb[..., c]]
    return dict(sam_pixel_values=torch.from_numpy(out), sam_size=(rh, rw))


def tiny_sam_config(family="sam"):
    """A random-weight config of `family` small enough for CPU tests and the demo (0.3-0.5M parameters): image 256
    (224 for sam3_tracker, patch 14), embeddings (64, 16, 16), mask input 64x64.
    SAM: num_pos_feats must be half the prompt hidden size, or the box embedding fails with a size mismatch, and
    SamVisionConfig's default initializer_range is 1e-10 (a random encoder would embed every image as ~1e-21).
    SAM 2: a global-attention block must not open a stage (its query pooling divides by the window size, 0 there)."""
    decoder = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_dim=128, iou_head_hidden_dim=64)
    if family in ("sam", "sam_hq"):
        vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=256, patch_size=16,
                      global_attn_indexes=[1], output_channels=64, window_size=4, mlp_dim=128, num_pos_feats=32,
                      initializer_range=0.02)
        prompt = dict(image_size=256, patch_size=16, hidden_size=64)
        if family == "sam":
            return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
        return SamHQConfig(vision_config=vision, prompt_encoder_config=prompt,
                           mask_decoder_config=dict(decoder, vit_dim=64))
    fpn = dict(fpn_hidden_size=64, backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]])
    if family == "sam2":
        backbone = dict(model_type="sam2_hiera_det_model", hidden_size=16, num_attention_heads=1, image_size=[256, 256],
                        blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[16, 32, 64, 128],
                        num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 4, 4, 4],
                        global_attention_blocks=[3], window_positional_embedding_background_size=[4, 4])
        return Sam2Config(vision_config=dict(backbone_config=backbone, backbone_channel_list=[128, 64, 32, 16], **fpn),
                          prompt_encoder_config=dict(hidden_size=64, image_size=256, patch_size=16,
                                                     mask_input_channels=8),
                          mask_decoder_config=decoder)
    if family == "sam3_tracker":
        backbone = dict(model_type="sam3_vit_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, image_size=224, patch_size=14, window_size=8, global_attn_indexes=[1],
                        pretrain_image_size=224)
        return Sam3TrackerConfig(vision_config=dict(backbone_config=backbone, **fpn),
                                 prompt_encoder_config=dict(hidden_size=64, image_size=224, patch_size=14,
                                                            mask_input_channels=8),
                                 mask_decoder_config=decoder)
    raise ValueError(f"tiny_sam_config: family {family!r} is not one of {sorted(FAMILIES)}")


def build_tiny_sam(out_dir, seed=0, family="sam"):
    """Write a random tiny SAM of `family` (`tiny_sam_config`) to `out_dir`; it loads with `load_sam(out_dir)`."""
    torch.manual_seed(seed)
    sam = FAMILIES[family](tiny_sam_config(family))
    if family in ("sam", "sam_hq"):
        with torch.no_grad():  # transformers draws SAM's Fourier matrix with std hidden/2 (32 here); segment-anything's
            # is std 1 (SAM 2's is 1 in both): at 32 a box corner's encoding aliases over the frame and a random tiny
            # SAM cannot learn where it is
            sam.shared_image_embedding.positional_embedding.normal_(0, 1)
    sam.save_pretrained(out_dir)
    return out_dir


def load_sam(name_or_path, dtype=torch.float32, device="cuda"):
    """A SAM of one of FAMILIES (by the config's model_type) from a local directory or a Hub id (e.g.
    facebook/sam-vit-large, facebook/sam2.1-hiera-large); never trust_remote_code. float32 by default: the prompt
    encoder and mask decoder train (under autocast)."""
    try:
        config = PretrainedConfig.get_config_dict(name_or_path)[0]  # the raw config.json, local or Hub
    except OSError as e:
        raise FileNotFoundError(f"SAM checkpoint {name_or_path!r}: no such directory, and no Hub repo that can be "
                                f"fetched ({e})") from e
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{name_or_path!r} is not a SAM checkpoint: its config's model_type is {family!r}, expected "
                         f"one of " + ", ".join(f"{k!r} ({v.__name__})" for k, v in FAMILIES.items()))
    return FAMILIES[family].from_pretrained(name_or_path, dtype=dtype).to(device)


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
    and its tokens' hidden states (one sparse token each), over the frozen image encoder's outputs."""

    def __init__(self, sam, *, hidden_size, text_layers, box="mask", detach_mask=False, encoder=True):
        """sam: a model of FAMILIES (its parts are taken, not copied); hidden_size: the VLM's; text_layers: how many
        of its last decoder layers give the phrase tokens' hidden states; box: "mask" (each phrase's coarse-mask box,
        F-LMM) or "vlm" (boxes given to forward); detach_mask: the dense prompt gets the coarse logits detached, so
        the refined loss does not reach the U-Net; encoder=False: SAM's image encoder is dropped (training from
        cached image embeddings never runs it; image_embeddings then raises)."""
        super().__init__()
        self.box, self.detach_mask = box, detach_mask
        self.family = sam.config.model_type
        if self.family not in FAMILIES:
            raise ValueError(f"Refiner: a {type(sam).__name__} ({self.family!r}) is not one of {sorted(FAMILIES)}")
        # Frozen and outside the module tree: state_dict, parameters(), train() and DDP never see it (`_apply` below
        # still moves its encoder and own parameters with .to()); this is also why it is never saved with ours.
        object.__setattr__(self, "sam", sam)
        sam.vision_encoder.requires_grad_(False).eval()
        if not encoder:
            del sam.vision_encoder  # its image embeddings come from a cache
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        # Frozen, as in segment-anything where the random Fourier matrix is a buffer (transformers' SAM: a Parameter).
        # The prompt encoder shares it with the model's shared_image_embedding, so the decoder's image-wide positional
        # embedding (1, C, e, e) is a constant too.
        self.prompt_encoder.shared_embedding.requires_grad_(False)
        self.register_buffer("image_pe", sam.get_image_wide_positional_embeddings().detach(), persistent=False)
        # Never in the graph with a box + mask prompt and one output mask (points, "no mask", the IoU head; SAM 2's
        # object-score head): frozen so that DDP needs no find_unused_parameters.
        unused = [self.prompt_encoder.no_mask_embed, self.mask_decoder.iou_prediction_head]
        c = self.image_pe.shape[1]  # the decoder's width
        e = self.prompt_encoder.image_embedding_size[0]  # the embedding grid: 64 at S = 1024 (SAM 3: 72 at 1008)
        self.image_shapes = {"sam_embeddings": (c, e, e)}  # per image, from image_embeddings
        if self.family in SQUARE:
            # SAM 2's box embedding uses rows 2, 3 of point_embed and not_a_point_embed (its padding point)
            unused += [self.mask_decoder.pred_obj_score_head, self.mask_decoder.conv_s0, self.mask_decoder.conv_s1]
            sam.no_memory_embedding.requires_grad_(False)  # added to the embeddings inside get_image_embeddings
            # In eval, a single-mask decoder would swap in one of the multimask outputs when its mask is unstable:
            # train and eval must read the same (trained) mask token
            self.mask_decoder.dynamic_multimask_via_stability = False
            self.image_shapes.update(sam_feat_s0=(c // 8, 4 * e, 4 * e), sam_feat_s1=(c // 4, 2 * e, 2 * e))
        else:
            unused += [*self.prompt_encoder.point_embed[:2], self.prompt_encoder.not_a_point_embed]
            if self.family == "sam_hq":  # the ViT's first global-attention block, channels last
                self.image_shapes["sam_intermediate"] = (e, e, sam.config.vision_config.hidden_size)
        for module in unused:
            module.requires_grad_(False)
        self.size = self.prompt_encoder.input_image_size  # S: 1024 (SAM 3: 1008)
        self.mask_size = 4 * e  # SAM's mask input: 256 (4x the embedding grid)
        # refiner.sam_image's keyword arguments for this family: what the DataLoader prepares (build.sam_size)
        self.image_settings = dict(size=self.size, square=self.family in SQUARE,
                                   image_mean=HALF if self.family == "sam3_tracker" else IMAGENET_MEAN,
                                   image_std=HALF if self.family == "sam3_tracker" else IMAGENET_STD)
        self.text_proj = nn.Linear(hidden_size, c)
        self.layer_weights = nn.Parameter(torch.zeros(text_layers))  # logits of the layer mix: uniform at start

    @property
    def vision_encoder(self):
        return getattr(self.sam, "vision_encoder", None)

    def _apply(self, fn, recurse=True):
        # unregistered, but it must follow .to(device) / .cuda(): the encoder and the model's own parameters (SAM 2's
        # no_memory_embedding); the prompt encoder and decoder are ours, moved by super()
        if self.vision_encoder is not None:
            self.vision_encoder._apply(fn, recurse)
        self.sam._apply(fn, recurse=False)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def image_embeddings(self, sam_pixel_values):
        """float (B, 3, S, S) from `sam_image` -> dict of the frozen encoder's outputs, each (B, *image_shapes[key]):
        sam_embeddings (B, C, e, e); SAM-HQ also sam_intermediate (B, e, e, vit_dim); SAM 2/3 also sam_feat_s0
        (B, C/8, 4e, 4e), sam_feat_s1 (B, C/4, 2e, 2e). Once per image: its phrases share them."""
        if self.vision_encoder is None:
            raise RuntimeError("this Refiner was built without SAM's image encoder (encoder=False: for cached image "
                               "embeddings); build it with encoder=True to embed images")
        if sam_pixel_values.shape[1:] != (3, self.size, self.size):
            raise ValueError(f"sam_pixel_values: expected (B, 3, {self.size}, {self.size}) for this SAM, got "
                             f"{tuple(sam_pixel_values.shape)}; build them with sam_image(image, "
                             f"**refiner.image_settings)")
        pixels = sam_pixel_values.to(next(self.vision_encoder.parameters()).dtype)
        out = self.sam.get_image_embeddings(pixels)  # the model's own: SAM 2's conv_s0/s1 and no-memory embedding
        if self.family == "sam":
            return dict(sam_embeddings=out)
        if self.family == "sam_hq":
            return dict(sam_embeddings=out[0], sam_intermediate=out[1][0])  # the decoder reads only the first
        feat_s0, feat_s1, embeddings = out  # high to low resolution
        return dict(sam_embeddings=embeddings, sam_feat_s0=feat_s0, sam_feat_s1=feat_s1)

    def forward(self, coarse, image, phrase_image, hidden, sam_sizes, boxes=None):
        """Refine every phrase of a batch.

        coarse: list of N float (h_k, w_k) U-Net logits, each over its whole image (any resolution, same aspect);
        image: dict of per-image tensors from `image_embeddings` (the keys of `image_shapes`); phrase_image: N ints,
        the image of each phrase; hidden: list of N float (T_k, text_layers, hidden_size), the phrase tokens' hidden
        states (last layers); sam_sizes: B (rh, rw) from `sam_image`; boxes: None (each phrase's coarse-mask box,
        F-LMM) or N float (4,) box prompts (x0, y0, x1, y1) in its `sam_sizes` frame (vlmbox.sam_boxes). Returns a
        list of N float (rh, rw) refined logits.

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
        # sparse (N, 1, 2, C): the box corners (SAM 2: + a padding point, 3); dense (N, C, e, e)
        tokens = torch.cat(hidden)  # (sum T_k, L, D)
        if tokens.shape[1:] != (len(self.layer_weights), self.text_proj.in_features):
            raise ValueError(f"hidden: expected (T, {len(self.layer_weights)}, {self.text_proj.in_features}) per "
                             f"phrase (text_layers, hidden_size), got {tuple(tokens.shape[1:])}")
        mix = self.layer_weights.softmax(0)  # (L,)
        text = self.text_proj((tokens.to(mix.dtype) * mix[:, None]).sum(1))  # (sum T_k, C)
        lengths = [len(h) for h in hidden]
        text = text.split(lengths)  # N x (T_k, C)
        image = {k: v.to(self.image_pe.dtype) for k, v in image.items()}  # cache.py's are float16: the decoder's convs
        embeddings = image["sam_embeddings"]  # (SAM-HQ's, on the raw maps) need its dtype
        image_of = torch.as_tensor(phrase_image, device=embeddings.device)
        refined = [None] * len(coarse)
        for length in sorted(set(lengths)):
            group = [k for k, t in enumerate(lengths) if t == length]
            index = torch.as_tensor(group, device=embeddings.device)
            rows = image_of[index]
            prompts = torch.cat([sparse[index], torch.stack([text[k] for k in group])[:, None]], dim=2)  # (n,1,s+T,C)
            # Each phrase has its own dense prompt, so each is its own batch row with its image's embeddings
            # (point_batch > 1 would share one dense prompt among the points of a row).
            args = (embeddings[rows], self.image_pe, prompts, dense[index])
            if self.family == "sam":
                low_res = self.mask_decoder(*args, multimask_output=False)[0]
            elif self.family == "sam_hq":  # SamHQModel's default: SAM's mask + the HQ token's
                low_res = self.mask_decoder(*args, multimask_output=False, hq_token_only=False,
                                            intermediate_embeddings=[image["sam_intermediate"][rows]])[0]
            else:
                low_res = self.mask_decoder(*args, multimask_output=False, high_resolution_features=[
                    image["sam_feat_s0"][rows], image["sam_feat_s1"][rows]])[0]
            # low_res (n, 1, 1, m, m)
            up = F.interpolate(low_res[:, 0], size=(self.size, self.size), mode="bilinear", align_corners=False)
            for j, k in enumerate(group):
                rh, rw = sizes[k]
                refined[k] = up[j, 0, :rh, :rw]  # the padding is not the image
        return refined
