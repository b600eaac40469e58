"""refiner.py: SAM's input against transformers' processors, the prompts, each family's forward against its own
model, gradients, batching, training, save/load."""
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

import refiner

HIDDEN, LAYERS = 32, 3  # the VLM side: hidden size and how many last layers give the phrase hidden states


def noise(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "LA": 2, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)


def transparent_rgba(h, w):
    image = noise(h, w, "RGBA", seed=1)
    alpha = np.zeros((h, w), np.uint8)
    alpha[: h // 2] = 255  # half opaque, half transparent, a gradient column
    alpha[:, : max(1, w // 4)] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    image.putalpha(Image.fromarray(alpha))
    return image


def palette_with_transparency(h, w):
    image = noise(h, w, "RGB", seed=2).quantize(16)
    image.info["transparency"] = 3
    return image


CASES = [  # (name, image): modes, tiny (below SAM's 16-px patch), portrait, landscape, exact, larger than 1024
    ("1x1", noise(1, 1)), ("tiny 5x7", noise(5, 7)), ("tiny 12x3", noise(12, 3)), ("coco 480x640", noise(480, 640)),
    ("portrait 517x333", noise(517, 333)), ("wide 20x3999", noise(20, 3999)), ("exact 1024", noise(1024, 1024)),
    ("large 1500x1100", noise(1500, 1100)), ("L", noise(97, 131, "L")), ("RGBA", transparent_rgba(101, 77)),
    ("P+transparency", palette_with_transparency(70, 90)), ("LA", noise(50, 61, "LA")), ("CMYK", noise(88, 99, "CMYK")),
]


@pytest.mark.parametrize("family", ["sam", "sam_hq"])
@pytest.mark.parametrize("size", [refiner.SAM_SIZE, 256])
@pytest.mark.parametrize("name,image", CASES, ids=[c[0] for c in CASES])
def test_sam_image_matches_transformers_bit_for_bit(name, image, size, family, sam_dirs):
    settings = dict(make_refiner(sam_dirs[family]).image_settings, size=size)  # what the DataLoader is given
    out = refiner.sam_image(image, **settings)
    ref = SamImageProcessorPil(size={"longest_edge": size}, pad_size={"height": size, "width": size})(
        images=image, return_tensors="pt")
    assert out["sam_pixel_values"].dtype == torch.float32 and out["sam_pixel_values"].shape == (3, size, size)
    assert out["sam_size"] == tuple(ref["reshaped_input_sizes"][0].tolist()), name
    assert (out["sam_pixel_values"] - ref["pixel_values"][0]).abs().max().item() == 0, name


def test_sam_image_rejects_a_side_that_rounds_to_zero():
    with pytest.raises(ValueError, match="3000x1 .* aspect ratio"):
        refiner.sam_image(noise(1, 3000))



SQUARE = [("sam2", 1024), ("sam3_tracker", 1008)]  # family, the side its processor resizes to


@pytest.mark.parametrize("family,size", SQUARE, ids=[s[0] for s in SQUARE])
@pytest.mark.parametrize("name,image", CASES, ids=[c[0] for c in CASES])
def test_square_sam_image_is_the_torchvision_processors_arithmetic(name, image, family, size, sam_dirs):
    """Without torchvision (not a dependency): the same steps written per pixel, not through the look-up table:
    transparency on white, torch's uint8 antialiased bilinear to S x S, (x - mean*255) / (std*255) in float32 with
    SAM 2's ImageNet or SAM 3's 0.5 mean/std."""
    settings = dict(make_refiner(sam_dirs[family]).image_settings, size=size)
    out = refiner.sam_image(image, **settings)
    assert out["sam_size"] == (size, size) and out["sam_pixel_values"].shape == (3, size, size)
    rgb = torch.from_numpy(np.array(refiner.qwen_inputs.to_rgb(image))).permute(2, 0, 1)[None]
    if rgb.shape[-2:] != (size, size):
        rgb = F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean, std = {"sam2": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), "sam3_tracker": ([0.5] * 3, [0.5] * 3)}[family]
    mean, std = torch.tensor(mean) * 255.0, torch.tensor(std) * 255.0
    ref = (rgb[0].float() - mean[:, None, None]) / std[:, None, None]
    assert (out["sam_pixel_values"] - ref).abs().max().item() == 0, name


@pytest.mark.parametrize("family,size", SQUARE, ids=[s[0] for s in SQUARE])
@pytest.mark.parametrize("name,image", CASES, ids=[c[0] for c in CASES])
def test_square_sam_image_matches_transformers_bit_for_bit(name, image, family, size, sam_dirs):
    """Against Sam2ImageProcessor / Sam3ImageProcessor themselves (their defaults): they exist only with torchvision,
    which is not a dependency: skipped without it."""
    pytest.importorskip("torchvision")
    if family == "sam2":
        from transformers.models.sam2.image_processing_sam2 import Sam2ImageProcessor as Processor
    else:
        from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor as Processor
    ref = Processor()(images=image, return_tensors="pt")["pixel_values"][0]
    out = refiner.sam_image(image, **dict(make_refiner(sam_dirs[family]).image_settings, size=size))
    assert (out["sam_pixel_values"] - ref).abs().max().item() == 0, name


# ----------------------------------------------------------------------------------------------- the model

FAMILIES = list(refiner.FAMILIES)


@pytest.fixture(scope="module")
def sam_dirs(tmp_path_factory):
    """A random tiny checkpoint of every family (S = 256, 224 for sam3_tracker; embeddings (64, 16, 16), mask input
    64x64)."""
    root = tmp_path_factory.mktemp("tiny_sams")
    return {f: refiner.build_tiny_sam(str(root / f), seed=0, family=f) for f in FAMILIES}


def make_refiner(sam_dir, seed=0):
    """A fresh Refiner on a tiny SAM."""
    torch.manual_seed(seed)
    return refiner.Refiner(refiner.load_sam(sam_dir, device="cpu"), hidden_size=HIDDEN, text_layers=LAYERS)


def rows(image, i, j):
    """Images i..j-1 of an image_embeddings dict."""
    return {k: v[i:j] for k, v in image.items()}


def example(r, seed=0):
    """Three images of different shapes, seven phrases of 1-5 tokens; coarse logits at several resolutions, one
    of them empty."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(48, 64), (90, 50), (40, 40)]
    images = [refiner.sam_image(noise(h, w, seed=i), **r.image_settings) for i, (h, w) in enumerate(shapes)]
    image = r.image_embeddings(torch.stack([im["sam_pixel_values"] for im in images]))
    sam_sizes = [im["sam_size"] for im in images]  # SAM: (192, 256), (256, 142), (256, 256); SAM 2: (256, 256)
    phrase_image = [0, 0, 1, 2, 1, 0, 2]
    coarse_shapes = {0: (12, 16), 1: (18, 10), 2: (8, 8)}
    coarse = [2 * torch.randn(coarse_shapes[i], generator=g) for i in phrase_image]
    coarse[3] = -coarse[3].abs() - 0.1  # an empty coarse mask: the box is the whole frame
    coarse = [c.requires_grad_() for c in coarse]
    hidden = [torch.randn(t, LAYERS, HIDDEN, generator=g) for t in (2, 5, 2, 1, 5, 3, 2)]
    return coarse, image, phrase_image, hidden, sam_sizes


def test_box_of_a_known_mask_in_the_sam_frame():
    coarse = torch.full((12, 16), -4.0, requires_grad=True)
    with torch.no_grad():
        coarse[3:7, 4:10] = 2.0  # rows 3-6, columns 4-9
        coarse[8, 0] = 0.0  # sigmoid(0) = 0.5 is not above 0.5
    box = refiner.box_of(coarse, (192, 256))  # the frame is 16x the coarse grid
    assert not box.requires_grad
    assert box.tolist() == [4 * 16, 3 * 16, 10 * 16, 7 * 16]  # (x0, y0, x1, y1), ends exclusive, scaled
    box = refiner.box_of(coarse, (150, 200))  # 12.5x
    assert torch.allclose(box, torch.tensor([4, 3, 10, 7]) * 12.5)
    one = torch.full((12, 16), -1.0)
    one[11, 15] = 1.0  # a single pixel in the corner still has a box
    assert refiner.box_of(one, (12, 16)).tolist() == [15, 11, 16, 12]


def test_box_of_an_empty_mask_is_the_whole_frame():
    assert refiner.box_of(torch.full((12, 16), -3.0), (192, 256)).tolist() == [0, 0, 256, 192]


def test_mask_prompt_shape_and_padding():
    coarse = torch.rand(12, 16) * 3.5 - 0.5  # min above -1: the padding is -1
    prompt = refiner.mask_prompt(coarse, (192, 256), 256, 64)
    assert prompt.shape == (1, 1, 64, 64)
    assert (prompt[..., 49:, :] == -1).all()  # rows 192..255 of the frame are padding (48 prompt rows = 192 px)
    inside = F.interpolate(F.interpolate(coarse[None, None], (192, 256), mode="bilinear"), (48, 64), mode="bilinear")
    assert torch.equal(prompt[..., :47, :], inside[..., :47, :])  # the image sits top-left, at the frame's scale
    low = coarse - 7  # min below -1: the padding is the min
    assert torch.equal(refiner.mask_prompt(low, (192, 256), 256, 64)[..., 49:, :], low.min().expand(1, 1, 15, 64))


@pytest.mark.parametrize("family", FAMILIES)
def test_refined_mask_equals_the_models_own_forward_without_text(family, sam_dirs):
    """With no text tokens, the refiner is the family's Model(pixel_values, box, mask) forward, single mask output
    (SAM 2/3 with the dynamic multimask switch off, as the refiner runs it), upsampled and cropped to the frame."""
    r = make_refiner(sam_dirs[family])
    model = refiner.load_sam(sam_dirs[family], device="cpu").eval()
    if family in refiner.SQUARE:
        model.mask_decoder.dynamic_multimask_via_stability = False
    coarse, _, _, _, _ = example(r)
    for k, (h, w) in enumerate([(48, 64), (90, 50)]):
        im = refiner.sam_image(noise(h, w, seed=k), **r.image_settings)
        pixels, frame = im["sam_pixel_values"][None], im["sam_size"]
        (out,) = r([coarse[2 * k]], r.image_embeddings(pixels), [0], [torch.zeros(0, LAYERS, HIDDEN)], [frame])
        box = refiner.box_of(coarse[2 * k], frame)[None, None]  # (1, 1, 4)
        with torch.no_grad():
            low_res = model(pixel_values=pixels, input_boxes=box, multimask_output=False,
                            input_masks=refiner.mask_prompt(coarse[2 * k], frame, r.size, r.mask_size)).pred_masks
        ref = F.interpolate(low_res[:, 0], size=(r.size, r.size), mode="bilinear")[0, 0, :frame[0], :frame[1]]
        assert out.shape == ref.shape == frame
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), (family, (out - ref).abs().max(), ref.abs().max())
        assert (out - ref).abs().max() < 0.01 * (ref - ref.mean()).abs().max()  # it is not all one constant


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_the_coarse_logits_and_never_the_image_encoder(family, sam_dirs):
    r = make_refiner(sam_dirs[family])
    encoder = r.vision_encoder
    coarse, image, phrase_image, hidden, sam_sizes = example(r)
    assert sorted(image) == sorted(r.image_shapes)
    assert all(v.shape[1:] == r.image_shapes[k] and not v.requires_grad for k, v in image.items())
    r.train()
    assert not encoder.training  # train() does not reach the frozen encoder
    out = r(coarse, image, phrase_image, hidden, sam_sizes)
    assert [o.shape for o in out] == [sam_sizes[i] for i in phrase_image]
    sum((o * torch.randn_like(o)).sum() for o in out).backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in coarse)  # the box is detached: dense prompt
    assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())
    encoder_ids = {id(p) for p in encoder.parameters()}
    assert not encoder_ids & {id(p) for p in r.parameters()}
    assert not [k for k in r.state_dict() if k.startswith("vision_encoder") or k.startswith("sam.")]
    missing = [n for n, p in r.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"trainable but unused (DDP would need find_unused_parameters): {missing}"
    assert r.layer_weights.grad.abs().sum() > 0 and r.text_proj.weight.grad.abs().sum() > 0  # the text prompt


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_forward_equals_the_per_phrase_loop(family, sam_dirs):
    r = make_refiner(sam_dirs[family])
    coarse, image, phrase_image, hidden, sam_sizes = example(r)
    batched = r(coarse, image, phrase_image, hidden, sam_sizes)
    grads = torch.autograd.grad(sum(o.square().mean() for o in batched), coarse)
    # A random decoder's logits are ~4e-4 (a trained SAM's are ~10): compare relative to the largest; the
    # batched and looped results differ by ~1e-5 of it (float32 sums in another order), another image's by ~1.
    for k, i in enumerate(phrase_image):  # F-LMM's way: one phrase, its own image, at a time
        (alone,) = r([coarse[k]], rows(image, i, i + 1), [0], [hidden[k]], [sam_sizes[i]])
        assert (batched[k] - alone).abs().max() <= 1e-4 * alone.abs().max(), k
        (grad,) = torch.autograd.grad(alone.square().mean(), coarse[k])
        assert (grads[k] - grad).abs().max() <= 1e-4 * grad.abs().max(), k
    # the tolerance means something only if the image matters (a random SAM at its default init sees none)
    (elsewhere,) = r([coarse[0]], rows(image, 1, 2), [0], [hidden[0]], [sam_sizes[0]])
    assert (elsewhere - batched[0]).abs().max() > 0.1 * batched[0].abs().max()
    for key in image:  # and every map of it is read: another image's changes the mask 10x beyond the tolerance
        (other,) = r([coarse[0]], dict(rows(image, 0, 1), **{key: image[key][1:2]}), [0], [hidden[0]], [sam_sizes[0]])
        assert (other - batched[0]).abs().max() > 1e-3 * batched[0].abs().max(), key


@pytest.mark.parametrize("family", ["sam", "sam_hq"])
def test_an_image_thinner_than_a_patch_refines(family, sam_dirs):
    r = make_refiner(sam_dirs[family])
    im = refiner.sam_image(noise(20, 3999), **r.image_settings)
    assert im["sam_size"] == (1, 256)  # one row of pixels: a sliver of one patch row
    image = r.image_embeddings(im["sam_pixel_values"][None])
    (out,) = r([torch.randn(1, 200)], image, [0], [torch.randn(2, LAYERS, HIDDEN)], [im["sam_size"]])
    assert out.shape == (1, 256) and torch.isfinite(out).all()


def bce_dice(logits, target):
    prob = logits.sigmoid().flatten()
    dice = 1 - (2 * (prob * target.flatten()).sum() + 1) / (prob.sum() + target.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_steps_lower_the_refined_loss(family, sam_dirs):
    r = make_refiner(sam_dirs[family])
    coarse, image, phrase_image, hidden, sam_sizes = example(r)
    coarse = [c.detach().requires_grad_() for c in coarse[:3]]  # the U-Net's output stands in as a parameter
    targets = []
    for k, i in enumerate(phrase_image[:3]):
        t = torch.zeros(sam_sizes[i])
        t[20 + 10 * k:100, 30:120 + 20 * k] = 1
        targets.append(t)
    opt = torch.optim.AdamW([dict(params=r.parameters()), dict(params=coarse, lr=2e-2)], lr=2e-3)
    fourier = r.prompt_encoder.shared_embedding.positional_embedding.clone()  # the frozen image_pe comes from it
    losses = []
    for _ in range(100):  # SAM 2 / 3 plateau near 1.2 for ~50 steps, then fall
        out = r(coarse, image, phrase_image[:3], hidden[:3], sam_sizes)
        loss = sum(bce_dice(o, t) for o, t in zip(out, targets)) / len(out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # sam2 1.51 -> 0.18, sam3_tracker 1.46 -> 0.05 when written
    assert torch.equal(r.prompt_encoder.shared_embedding.positional_embedding, fourier)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trips_into_a_fresh_refiner(family, sam_dirs):
    r = make_refiner(sam_dirs[family])
    with torch.no_grad():
        for p in r.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # differ from what a fresh SAM + init gives
    buf = io.BytesIO()
    torch.save(r.state_dict(), buf)
    fresh = make_refiner(sam_dirs[family], seed=1)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))  # strict: nothing missing
    args = example(r)
    for a, b in zip(r(*args), fresh(*args)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_to_moves_the_frozen_encoder_too(family, sam_dirs):
    r = make_refiner(sam_dirs[family]).double()
    image = r.image_embeddings(torch.zeros(1, 3, r.size, r.size))
    assert all(v.dtype == torch.float64 for v in image.values())
    assert all(p.dtype == torch.float64 for p in r.sam.parameters())  # SAM 2's no_memory_embedding too


def test_bad_inputs_raise_clearly(sam_dirs):
    r = make_refiner(sam_dirs["sam"])
    with pytest.raises(ValueError, match=r"expected \(B, 3, 256, 256\).*got \(1, 3, 1024, 1024\)"):
        r.image_embeddings(torch.zeros(1, 3, 1024, 1024))
    coarse, image, phrase_image, hidden, sam_sizes = example(r)
    with pytest.raises(ValueError, match=r"expected \(T, 3, 32\).*got \(2, 32\)"):
        r(coarse, image, phrase_image, [h[:, 1:] for h in hidden], sam_sizes)


def test_load_sam_on_a_missing_path_or_another_model(tmp_path):
    missing = str(tmp_path / "no_such_sam")
    with pytest.raises(FileNotFoundError, match="no_such_sam"):
        refiner.load_sam(missing, device="cpu")
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(ValueError, match="qwen.*not a SAM checkpoint.*'qwen2_5_vl'.*'sam' \\(SamModel\\), 'sam_hq' "
                                         "\\(SamHQModel\\), 'sam2' \\(Sam2Model\\), 'sam3_tracker'"):
        refiner.load_sam(str(tmp_path / "qwen"), device="cpu")


def test_the_text_prompt_mixes_the_layers_by_a_weighted_sum(sam_dirs):
    """F-LMM's text prompt is sum_l softmax(w)_l * hidden_l: with every layer equal to one layer's states the mix is
    those states themselves, exactly what a one-layer refiner with the same weights gives (a mean would be 1/L of
    them), and moving the softmax weight onto one layer makes the others irrelevant."""
    r = make_refiner(sam_dirs["sam"])
    one = refiner.Refiner(refiner.load_sam(sam_dirs["sam"], device="cpu"), hidden_size=HIDDEN, text_layers=1)
    one.load_state_dict({k: v for k, v in r.state_dict().items() if k != "layer_weights"}, strict=False)
    coarse, embeddings, phrase_image, hidden, sam_sizes = example(r)
    with torch.no_grad():
        same = [h[:, :1].expand(-1, LAYERS, -1) for h in hidden]  # every layer = layer 0
        for a, b in zip(r(coarse, embeddings, phrase_image, same, sam_sizes),
                        one(coarse, embeddings, phrase_image, [h[:, :1] for h in hidden], sam_sizes), strict=True):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()  # float32 sums in another order
        r.layer_weights.copy_(torch.tensor([-1e4, 50.0, -1e4]))  # all weight on layer 1
        junk = [h.clone() for h in hidden]
        for h in junk:
            h[:, [0, 2]] = 100 * torch.randn_like(h[:, [0, 2]])
        for a, b in zip(r(coarse, embeddings, phrase_image, hidden, sam_sizes),
                        r(coarse, embeddings, phrase_image, junk, sam_sizes), strict=True):
            assert torch.equal(a, b)
