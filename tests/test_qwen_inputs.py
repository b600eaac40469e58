"""qwen_inputs.py against transformers' own Qwen2-VL image processor and smart_resize, bit for bit."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

import draw
import qwen_inputs as qi


def official(image, min_pixels=qi.MIN_PIXELS, max_pixels=qi.MAX_PIXELS):
    proc = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = proc(images=image, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def noise(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "LA": 2, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)


def transparent_rgba(h, w):
    image = noise(h, w, "RGBA", seed=1)
    alpha = np.zeros((h, w), np.uint8)
    alpha[: h // 2] = 255  # half opaque, half fully transparent, and a gradient column
    alpha[:, : max(1, w // 4)] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    image.putalpha(Image.fromarray(alpha))
    return image


def palette_with_transparency(h, w):
    image = noise(h, w, "RGB", seed=2).quantize(16)
    image.info["transparency"] = 3
    return image


CASES = [  # (name, image)
    ("1x1", noise(1, 1)), ("tiny 5x7", noise(5, 7)), ("odd 333x517", noise(333, 517)),
    ("coco 480x640", noise(480, 640)), ("wide 20x3999", noise(20, 3999)), ("tall 4000x21", noise(4000, 21)),
    ("ratio 200", noise(15, 3000)), ("large 2100x3000", noise(2100, 3000)),
    ("exact 224x224", noise(224, 224)), ("L", noise(97, 131, "L")), ("P", noise(64, 80).quantize(32)),
    ("P+transparency", palette_with_transparency(70, 90)), ("RGBA", transparent_rgba(101, 77)),
    ("CMYK", noise(88, 99, "CMYK")), ("LA", noise(50, 61, "LA")),
]


@pytest.mark.parametrize("max_pixels", [qi.MAX_PIXELS, 28 * 28 * 64])
@pytest.mark.parametrize("name,image", CASES, ids=[c[0] for c in CASES])
def test_patchify_matches_official_bit_for_bit(name, image, max_pixels):
    pixel_values, grid = qi.patchify(image, max_pixels=max_pixels)
    ref_pixels, ref_grid = official(image, max_pixels=max_pixels)
    assert grid.dtype == torch.int64 and pixel_values.dtype == torch.float32
    assert torch.equal(grid, ref_grid), name
    assert pixel_values.shape == ref_pixels.shape == (int(grid.prod()), 1176)
    assert (pixel_values - ref_pixels).abs().max().item() == 0, name


def test_smart_resize_matches_transformers_on_random_sizes():
    rng = random.Random(0)
    for i in range(4000):
        h = rng.choice([rng.randint(1, 60), rng.randint(1, 2000), rng.randint(1, 20000)])
        w = rng.choice([rng.randint(1, 60), rng.randint(1, 2000), h * 200, h * 201 + 1])
        kw = dict(min_pixels=rng.choice([qi.MIN_PIXELS, 28 * 28 * 4, 200_000]),
                  max_pixels=rng.choice([qi.MAX_PIXELS, 28 * 28 * 64, 1003520]))
        try:
            expected = hf_smart_resize(h, w, 28, **kw)
        except ValueError as e:
            with pytest.raises(ValueError, match="aspect ratio"):
                qi.smart_resize(h, w, 28, **kw)
            assert "200" in str(e)
            continue
        assert qi.smart_resize(h, w, 28, **kw) == expected, (h, w, kw)
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        qi.smart_resize(10, 2001)


def test_patchify_refuses_extreme_aspect():
    with pytest.raises(ValueError, match="aspect ratio"):
        qi.patchify(noise(2, 500))


@pytest.mark.parametrize("name,image", [CASES[2], CASES[4], CASES[12]], ids=["odd", "wide", "RGBA"])
def test_unpatchify_inverts_patchify(name, image):
    pixel_values, grid = qi.patchify(image, max_pixels=28 * 28 * 256)
    (restored,) = draw.unpatchify(pixel_values, grid)
    assert np.array_equal(restored, qi.resized_rgb(image, max_pixels=28 * 28 * 256))


def test_build_inputs_layout_and_spans(tiny_qwen):
    _, _, tok = tiny_qwen
    _, grid = qi.patchify(noise(100, 150), max_pixels=28 * 28 * 16)
    phrases = ["the red circle on the left", "a big blue square", "zebra"]
    out = qi.build_inputs(tok, grid, phrases)
    ids, mm, mask_ids = out["input_ids"], out["mm_token_type_ids"], out["mask_ids"]
    assert ids.dtype == mm.dtype == mask_ids.dtype == torch.int64 and ids.shape == mm.shape == mask_ids.shape
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert int((ids == pad).sum()) == int(grid.prod()) // 4 == int(mm.sum())
    assert torch.equal(mm == 1, ids == pad)
    # the image pads are one contiguous run between vision_start and vision_end
    where = torch.nonzero(mm).flatten()
    assert torch.equal(where, torch.arange(int(where[0]), int(where[-1]) + 1))
    assert ids[where[0] - 1] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert ids[where[-1] + 1] == tok.convert_tokens_to_ids("<|vision_end|>")
    for k, phrase in enumerate(phrases):
        span = torch.nonzero(mask_ids == k).flatten()
        assert len(span) > 0 and torch.equal(span, torch.arange(int(span[0]), int(span[-1]) + 1))
        assert tok.decode(ids[span]) == phrase
    assert mask_ids[-1] == len(phrases) - 1  # nothing follows the last phrase
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\nthe red circle on the left\na big blue square\nzebra")


def test_build_inputs_space_separated_narrative(tiny_qwen):
    _, _, tok = tiny_qwen
    _, grid = qi.patchify(noise(56, 56))
    out = qi.build_inputs(tok, grid, ["a man", "holding", "a dog"], sep=" ")
    assert tok.decode(out["input_ids"]).endswith("assistant\na man holding a dog")
    for k, phrase in enumerate(["a man", "holding", "a dog"]):
        assert tok.decode(out["input_ids"][out["mask_ids"] == k]).strip() == phrase


def test_build_inputs_rejects_bad_phrases_and_length(tiny_qwen):
    _, _, tok = tiny_qwen
    _, grid = qi.patchify(noise(56, 56))
    with pytest.raises(ValueError, match="phrase 1 is empty"):
        qi.build_inputs(tok, grid, ["the dog", "   "])
    with pytest.raises(ValueError, match="no phrases"):
        qi.build_inputs(tok, grid, [])
    with pytest.raises(ValueError, match="exceed max_length=20"):
        qi.build_inputs(tok, grid, ["the dog"], max_length=20)
    with pytest.raises(ValueError, match="even"):
        qi.build_inputs(tok, torch.tensor([[1, 3, 4]]), ["the dog"])


def make_sample(tok, size, phrases, max_pixels=28 * 28 * 64):
    pixel_values, grid = qi.patchify(noise(*size), max_pixels=max_pixels)
    return dict(qi.build_inputs(tok, grid, phrases), pixel_values=pixel_values, image_grid_thw=grid,
                ref_ids=list(range(len(phrases))))


def test_collate_three_sizes_passes_the_check(tiny_qwen):
    _, qwen, tok = tiny_qwen
    samples = [make_sample(tok, (90, 60), ["red circle"]), make_sample(tok, (300, 500), ["a dog", "the man"]),
               make_sample(tok, (40, 41), ["zebra", "blue square", "left"])]
    batch = qi.collate(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    B, S = len(samples), max(lengths)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "mask_ids"):
        assert batch[key].shape == (B, S)
    for i, (s, n) in enumerate(zip(samples, lengths)):
        assert torch.equal(batch["input_ids"][i, :n], s["input_ids"])
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (S - n)  # right padding
        assert (batch["mask_ids"][i, n:] == -1).all() and (batch["mm_token_type_ids"][i, n:] == 0).all()
    assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in samples]))
    assert batch["image_grid_thw"].shape == (3, 3)
    assert batch["ref_ids"] == [[0], [0, 1], [0, 1, 2]]  # other keys are carried as lists
    qi.check_inputs(batch, qwen.config.image_token_id)


def test_check_names_the_seed_failures(tiny_qwen):
    _, _, tok = tiny_qwen
    # Seed bug 1: three images' patches with one image's grid (the 4692-vs-1564 RuntimeError in transformers).
    grid = torch.tensor([[1, 34, 46]])
    with pytest.raises(ValueError, match=r"pixel_values holds 4692 patch rows but image_grid_thw \[\[1, 34, 46\]\] "
                                         r"describes 1 image\(s\) with 1564 patches = 3 times as many"):
        qi.check_pixels(torch.zeros(3 * 1564, 1176), grid)
    # Seed bug 2: a missing grid must not be guessed.
    with pytest.raises(ValueError, match="image_grid_thw is missing"):
        qi.check_pixels(torch.zeros(1564, 1176), None)
    # an image tensor where patches belong
    with pytest.raises(ValueError, match=r"2-D \(num_patches, 1176\).*\(1, 3, 476, 644\)"):
        qi.check_pixels(torch.zeros(1, 3, 476, 644), grid, 1176)
    # Qwen3-VL's 16-px patches given to a 14-px model
    with pytest.raises(ValueError, match=r"2-D \(num_patches, 1176\).*\(1564, 1536\)"):
        qi.check_pixels(torch.zeros(1564, 1536), grid, 1176)
    # a batch whose pad-token count does not match its grid names the sample
    samples = [make_sample(tok, (56, 56), ["dog"]), make_sample(tok, (112, 112), ["cat"])]
    batch = qi.collate(samples)
    batch["mm_token_type_ids"][1, torch.nonzero(batch["mm_token_type_ids"][1])[0]] = 0
    with pytest.raises(ValueError, match=r"sample 1: 15 <\|image_pad\|> tokens .* needs 16"):
        qi.check_inputs(batch)
    batch = qi.collate(samples)
    batch["image_grid_thw"] = batch["image_grid_thw"][:1]
    with pytest.raises(ValueError, match="pixel_values holds 80 patch rows"):
        qi.check_inputs(batch)
