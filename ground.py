"""Use a trained grounder from Python: load it once, then ground phrases in pictures, chat and ground, or look at
the frozen VLM's attention maps the head reads.

    import ground
    g = ground.load_grounder("out/demo/ckpt.pt")        # a ckpt.pt, an export.py directory, or a Hub id holding one
    masks = g.ground(image, ["the red circle", "a big blue square"])   # one bool (H, W) numpy mask per phrase
    g.ground([im1, im2], [["a"], ["b", "c"]])           # several images in one forward: one list of masks each
    g.answer_and_ground(image, "What is left of the star?")  # chat.py: the VLM answers, its phrases are grounded
    g.maps(image, "the red circle")                     # the raw maps: (L*H, gh/2, gw/2) float32 + "L0 H0" labels

Images are PIL images or uint8 numpy arrays (H, W, 3) / (H, W). Masks come at the image's size and are the same
numbers eval.py computes (batching.picture_samples, eval.predict: one code path).
"""
import contextlib
import os

import numpy as np
import torch
from PIL import Image

import batching
import build
import chat
import draw
import eval as evaluation
import model
import qwen_inputs


def load_grounder(path_or_hub_id, device=None, model=None):
    """A ckpt.pt, an export.py directory or a Hub id holding one -> Grounding on `device` (None: CUDA when available,
    else the CPU). model: a local copy of the base VLM to load instead of the one named in the checkpoint (another
    VLM is refused, naming both)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Grounding(*build.load_run(path_or_hub_id, device, model=model))


def _pil(image, where):
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise TypeError(f"{where}: a PIL image or a uint8 numpy array (H, W), (H, W, 3) or (H, W, 4), got "
                        f"{type(image).__name__} {array.dtype} {array.shape}")
    return Image.fromarray(array)


def _requests(images, texts):
    """One image and a list of phrases, or a list of images and one list each -> (PIL images, phrase lists, batched)."""
    batched = isinstance(images, (list, tuple))
    images, texts = (list(images), list(texts)) if batched else ([images], [texts])
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} phrase lists: give one list of phrases per image")
    for i, phrases in enumerate(texts):
        if isinstance(phrases, str) or not phrases or not all(isinstance(p, str) for p in phrases):
            raise TypeError(f"image {i}: phrases must be a non-empty list of str (one mask each), got {phrases!r}")
    return [_pil(im, f"image {i}") for i, im in enumerate(images)], texts, batched


class Grounding:
    """The frozen VLM, the trained grounder (eval mode) and the settings they were trained with (build.load_run)."""

    def __init__(self, qwen, grounder, tokenizer, cfg):
        self.qwen, self.grounder, self.tokenizer, self.cfg = qwen, grounder, tokenizer, cfg
        self.device = qwen.device
        self.image_settings = build.image_settings(cfg, tokenizer)
        self.autocast = build.autocast_for(cfg, self.device)
        text = qwen.config.text_config
        self.layers, self.heads = text.num_hidden_layers, text.num_attention_heads

    def _batch(self, images, phrases, together):
        """One batch: each phrase independent (the standard protocol; an image's phrases packed behind one shared
        image prefix, cfg.pack_tokens), or with `together` one sequence per image holding all its phrases (F-LMM's
        protocol, `layout: image`); either way the outputs come in phrase order. -> (batch on the device, the (H, W)
        of each sequence's image)."""
        samples, sizes = [], []
        for i, (im, ps) in enumerate(zip(images, phrases)):  # image_id i: SAM encodes each image once
            rows = batching.picture_samples(self.tokenizer, self.image_settings, im, ps, i,
                                            pack_tokens=None if together else self.cfg.pack_tokens,
                                            sam_settings=build.sam_settings(self.grounder))
            samples += rows
            sizes += [(im.height, im.width)] * len(rows)
        return model.to_device(qwen_inputs.collate(samples), self.device), sizes

    @torch.no_grad()
    def ground(self, images, phrases, *, coarse=False, return_logits=False, together=False):
        """One image + a list of phrases -> one bool numpy (H, W) mask per phrase, at the image's size (a list of
        images + one list of phrases each -> one such list per image, all in one forward). Each phrase is read in
        its own sequence, as eval.py's standard protocol does (an image's phrases packed behind one image prefix: one
        forward per image, exact per phrase) (together: an image's phrases in one sequence, as its
        flmm protocol). coarse: the U-Net's masks instead of the refiner's; return_logits: float32 logits
        (mask = logits > 0) instead of masks."""
        images, phrases, batched = _requests(images, phrases)
        batch, sizes = self._batch(images, phrases, together)
        with self.autocast:
            out = evaluation.predict(self.qwen, self.grounder, batch, sizes, coarse=coarse, logits=return_logits)
        out = [x.cpu().numpy() for x in out]
        starts = np.cumsum([0] + [len(p) for p in phrases])
        per_image = [out[a:b] for a, b in zip(starts[:-1], starts[1:])]
        return per_image if batched else per_image[0]

    @torch.no_grad()
    def maps(self, images, texts, *, together=False):
        """One image + a list of texts -> per text the raw attention maps the head reads: dict(maps=float32 numpy
        (L*H, gh/2, gw/2) (channel layer*H + head, model.frozen_outputs), labels=["L0 H0", ...] per channel). A list
        of images + one list of texts each -> one such list per image. together: as in `ground`."""
        images, texts, batched = _requests(images, texts)
        maps = model.frozen_outputs(self.qwen, self._batch(images, texts, together)[0])["maps"]
        labels = [f"L{c // self.heads} H{c % self.heads}" for c in range(self.layers * self.heads)]
        out = [dict(maps=m.cpu().numpy(), labels=labels) for m in maps]
        starts = np.cumsum([0] + [len(t) for t in texts])
        per_image = [out[a:b] for a, b in zip(starts[:-1], starts[1:])]
        return per_image if batched else per_image[0]

    @torch.no_grad()
    def answer_and_ground(self, images, questions, phrases=None, **generate):
        """chat.py's path: the VLM answers each question about its image (chat.generate; generate: max_new_tokens,
        do_sample, temperature, ...), then the answer's phrases are grounded (chat.ground): the checkpoint's selector
        picks them, or `phrases` (a list per image, each a substring of its answer). One image + one question ->
        dict(answer, phrases, masks: bool numpy (H, W) per phrase); lists -> a list of them."""
        batched = isinstance(images, (list, tuple))
        images, questions = (list(images), list(questions)) if batched else ([images], [questions])
        images = [_pil(im, f"image {i}") for i, im in enumerate(images)]
        phrases = None if phrases is None else list(phrases) if batched else [phrases]
        answers = chat.generate(self.qwen, self.tokenizer, images, questions, self.image_settings, **generate)
        results = chat.ground(self.qwen, self.grounder, self.tokenizer, self.image_settings, images, questions,
                              answers, phrases)
        out = [dict(answer=a, phrases=[a[s:e] for s, e in r["spans"]], masks=[m.numpy() for m in r["masks"]])
               for a, r in zip(answers, results, strict=True)]
        return out if batched else out[0]

    def maps_picture(self, image, text, top=8):
        """One image and one text -> uint8 (h, w, 3) attention_picture: every layer's maps, the heads the head
        weighs most, and the final mask."""
        (image,), _, _ = _requests(image, [text])
        (mask,) = self.ground(image, [text])
        (maps,) = self.maps(image, [text])
        head = getattr(self.grounder, "module", self.grounder).head
        return draw.attention_picture(np.asarray(image.convert("RGB")), maps["maps"], mask, text, heads=self.heads,
                                 weights=head.channel_weights().cpu().numpy(), top=top)


@torch.no_grad()
def loader_pictures(qwen, grounder, loader, device, heads, n=3, autocast=contextlib.nullcontext()):
    """attention_picture for the first n phrases of a val loader's first batch (online or cached: build.extract),
    stacked top to bottom -> uint8 (h, w, 3), for tensorboard. The images are read from the dataset's files."""
    batch = model.to_device(next(iter(loader)), device, model.DEVICE_KEYS + ("gt_masks",))
    sizes = evaluation.gt_sizes(batch)
    with autocast:
        frozen = build.extract(qwen, grounder, batch)
        masks = evaluation.predict(qwen, grounder, dict(batch, frozen=frozen), sizes)  # reuses frozen
    weights = getattr(grounder, "module", grounder).head.channel_weights().cpu().numpy()
    phrases = [p for ps in batch["phrases"] for p in ps]
    pictures = []
    for k in range(min(n, len(phrases))):
        b = frozen["phrase_image"][k]
        with Image.open(os.path.join(loader.dataset.image_dir, batch["file_name"][b])) as f:
            image = np.asarray(f.convert("RGB"))
        pictures.append(draw.attention_picture(image, frozen["maps"][k].float().cpu().numpy(), masks[k].cpu().numpy(),
                                          phrases[k], heads=heads, weights=weights))
    width = max(p.shape[1] for p in pictures)
    return np.concatenate([np.pad(p, ((0, 8), (0, width - p.shape[1]), (0, 0)), constant_values=255)
                           for p in pictures], 0)
