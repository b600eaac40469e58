"""Every picture the project draws, from arrays (numpy, PIL; no model, no matplotlib): a prediction against the truth
(eval.py's overlays and tensorboard), several phrases in one picture with a legend (chat.py), and what the VLM
attends to for one phrase (eval.py --maps, ground.py, tensorboard). Images are uint8 (H, W, 3), masks bool (H, W)."""
import numpy as np
import torch.nn.functional as F
from PIL import Image, ImageDraw

import qwen_inputs

def unpatchify(pixel_values, image_grid_thw, *, patch_size=qwen_inputs.PATCH, merge_size=qwen_inputs.MERGE,
               temporal_patch_size=qwen_inputs.TEMPORAL,
               image_mean=qwen_inputs.CLIP_MEAN, image_std=qwen_inputs.CLIP_STD, min_pixels=None, max_pixels=None):
    """Inverse of `patchify` for a batch: one uint8 RGB array (gh*patch, gw*patch, 3) per row of image_grid_thw.
    Takes the settings patchify was given (`**image_settings(checkpoint)`; the pixel bounds play no part here)."""
    p, m, t = patch_size, merge_size, temporal_patch_size
    qwen_inputs.check_pixels(pixel_values, image_grid_thw, 3 * t * p * p)
    mean, std = np.array(image_mean, dtype=np.float32), np.array(image_std, dtype=np.float32)
    images, start = [], 0
    for frames, gh, gw in image_grid_thw.tolist():
        x = pixel_values[start:start + frames * gh * gw].double().numpy()
        start += frames * gh * gw
        x = x.reshape(gh // m, gw // m, m, m, 3, t, p, p)[..., 0, :, :]
        x = x.transpose(0, 2, 5, 1, 3, 6, 4).reshape(gh * p, gw * p, 3)  # first frame, (H, W, 3)
        images.append(np.clip(np.rint((x * std + mean) * 255), 0, 255).astype(np.uint8))
    return images


PRED_RGB, TRUTH_RGB = np.array([0, 230, 230]), np.array([255, 0, 255])  # cyan prediction, magenta truth


def edge(mask):
    """The pixels of a bool mask that touch its outside (4-neighbourhood)."""
    return mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))


def overlay(image, pred, gt=None, text=""):
    """uint8 (H, W, 3) image + bool masks -> uint8 picture with a 14-px caption band above it: the prediction tinted
    and outlined in cyan, the truth outlined in magenta (2 px)."""
    out = image.astype(np.float32)
    out[pred] = 0.45 * out[pred] + 0.55 * PRED_RGB
    out[edge(pred)] = PRED_RGB
    if gt is not None:
        outer = edge(gt)
        out[outer | edge(gt & ~outer)] = TRUTH_RGB
    picture = Image.new("RGB", (image.shape[1], image.shape[0] + 14))
    picture.paste(Image.fromarray(out.astype(np.uint8)), (0, 14))
    ImageDraw.Draw(picture).text((2, 1), text[:120], fill=(255, 255, 255))
    return np.asarray(picture)


def overlay_grid(batch, out, image_settings):
    """The first sample of a (device) batch, every phrase side by side at the resized resolution (for tensorboard):
    the coarse masks, and below them the refined ones when the grounder has a refiner. image_settings: patchify's."""
    n_pix = int(batch["host"]["image_grid_thw"][0].prod())
    (image,) = unpatchify(batch["pixel_values"][:n_pix].cpu(), batch["host"]["image_grid_thw"][:1],
                                      **image_settings)
    k = len(batch["phrases"][0])
    rows = []
    for kind in ("coarse", "refined"):
        if kind in out:
            tiles = []
            for x, m, phrase in zip(out[kind][:k], batch["masks"][0], batch["phrases"][0]):
                x = F.interpolate(x.detach().float()[None, None], size=image.shape[:2], mode="bilinear")[0, 0]
                tiles.append(overlay(image, (x > 0).cpu().numpy(), m.cpu().numpy() > 0.5, f"{kind}: {phrase}"))
            rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


PALETTE = np.array([(0, 230, 230), (255, 0, 255), (0, 0, 0), (255, 150, 200), (0, 0, 110), (120, 70, 20),
                    (110, 110, 0), (170, 255, 0)], np.uint8)  # cyan magenta black pink navy brown olive lime


def phrases_picture(image, masks, phrases):
    """uint8 (H, W, 3) image + one bool mask per phrase -> uint8 picture: each mask tinted and outlined in its own
    colour (PALETTE[k]), a legend below (a swatch and '(k) phrase' per line)."""
    out = np.asarray(image, np.float32).copy()
    for k, m in enumerate(masks):
        colour = PALETTE[k % len(PALETTE)]
        out[m] = 0.5 * out[m] + 0.5 * colour
        out[edge(m)] = colour
    h, w = out.shape[:2]
    line = 14
    canvas = Image.new("RGB", (w, h + line * max(1, len(phrases)) + 4), (255, 255, 255))
    canvas.paste(Image.fromarray(out.round().astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, phrase in enumerate(phrases):
        y = h + 2 + line * k
        draw.rectangle([2, y + 1, 12, y + 11], fill=tuple(int(c) for c in PALETTE[k % len(PALETTE)]))
        draw.text((16, y), f"({k + 1}) {phrase}"[:120], fill=(0, 0, 0))
    if not phrases:
        draw.text((2, h + 2), "(no phrase grounded)", fill=(0, 0, 0))
    return np.asarray(canvas)


# A dark-to-bright colour ramp (black, purple, red, orange, pale yellow) for attention: readable without matplotlib.
RAMP = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], np.float32)
CAPTION = 14  # pixels of the text band above each tile (PIL's default font is 11 px high)


def _heat(image, attention, size):
    """uint8 (H, W, 3) image + one (h, w) attention map -> uint8 tile of `size` (w, h): the map stretched to its own
    min..max, coloured with RAMP (bilinear), over a dimmed grey copy of the image."""
    a = np.asarray(Image.fromarray(attention.astype(np.float32)).resize(size, Image.BILINEAR))
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
    colour = np.stack([np.interp(a, np.linspace(0, 1, len(RAMP)), RAMP[:, c]) for c in range(3)], -1)
    grey = np.asarray(Image.fromarray(image).convert("L").resize(size, Image.BILINEAR), np.float32)[..., None]
    return (0.75 * colour + 0.25 * grey).astype(np.uint8)


def _captioned(tile, text, width=None):
    width = width or tile.shape[1]
    out = Image.new("RGB", (width, tile.shape[0] + CAPTION), (255, 255, 255))
    out.paste(Image.fromarray(tile), (0, CAPTION))
    ImageDraw.Draw(out).text((2, 1), text, fill=(0, 0, 0))
    return np.asarray(out)


def _rows(tiles, per_row, gap=4):
    """Equal-size tiles -> one uint8 array, per_row tiles a row, white gaps."""
    th, tw = tiles[0].shape[:2]
    rows = (len(tiles) + per_row - 1) // per_row
    out = np.full((rows * (th + gap), per_row * (tw + gap), 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, per_row)
        out[r * (th + gap):r * (th + gap) + th, c * (tw + gap):c * (tw + gap) + tw] = t
    return out


def attention_picture(image, maps, mask, text, *, heads, weights, top=8, tile=96):
    """What the VLM attends to for one phrase, as one uint8 (h, w, 3) picture (PIL only):
    left, the image with the final mask (overlay, captioned with the phrase); right, above, the mean over heads
    of every layer's map ("layer l"); below, the `top` heads the trained U-Net weighs most ("Lx Hy", ranked by
    `weights`, head.MaskHead.channel_weights). image: uint8 (H, W, 3); maps: (L*H, h, w), channel layer*H + head;
    mask: bool (H, W); weights: (L*H,)."""
    H, W = image.shape[:2]
    size = (tile, max(1, round(tile * H / W))) if W >= H else (max(1, round(tile * W / H)), tile)  # (w, h)
    layers = maps.shape[0] // heads
    per_layer = maps.reshape(layers, heads, *maps.shape[1:]).mean(1)
    layer_tiles = [_captioned(_heat(image, m, size), f"layer {l}") for l, m in enumerate(per_layer)]
    ranked = np.argsort(-np.asarray(weights), kind="stable")[:top]
    head_tiles = [_captioned(_heat(image, maps[c], size), f"L{c // heads} H{c % heads}") for c in ranked]
    per_row = max(min(8, max(len(layer_tiles), len(head_tiles))), 1)
    grids = [_captioned(_rows(layer_tiles, per_row), "attention of the phrase, mean over heads, per layer",
                        per_row * (size[0] + 4)),
             _captioned(_rows(head_tiles, per_row), "the heads the mask head weighs most (first-layer weight norm)",
                        per_row * (size[0] + 4))]
    right = np.concatenate(grids, 0)
    side = 2 * tile + 4  # the mask panel: twice a tile's long side
    scale = side / max(H, W)
    small = np.asarray(Image.fromarray(image).resize((max(1, round(W * scale)), max(1, round(H * scale)))))
    small_mask = np.asarray(Image.fromarray(mask).resize(small.shape[1::-1], Image.NEAREST))
    left = _captioned(overlay(small, small_mask, None, "")[CAPTION:], f"mask: {text}"[:60])
    height = max(left.shape[0], right.shape[0])
    out = np.full((height, left.shape[1] + 8 + right.shape[1], 3), 255, np.uint8)
    out[:left.shape[0], :left.shape[1]] = left
    out[:right.shape[0], left.shape[1] + 8:] = right
    return out
