"""head.py: what the mask head must do with its inputs (normalisation, each phrase its own image's vision features),
and the per-phrase loss. Each test is aimed at a breakage that once passed the whole suite."""
import pytest
import torch

import head as heads


def frozen(maps, vision=None, phrase_image=None):
    return dict(maps=maps, vision=vision, hidden=None,
                phrase_image=phrase_image if phrase_image is not None else list(range(len(maps))))


def test_each_channel_is_normalised():
    """The head reads each attention map as a distribution over the image tokens: scaling one channel of one
    phrase by any positive factor (a layer whose attention to the image is 10x weaker) changes nothing."""
    torch.manual_seed(0)
    head = heads.MaskHead(in_channels=6, base=8, size=16).eval()
    maps = torch.rand(6, 5, 7)
    scaled = maps.clone()
    scaled[2] *= 37.0
    scaled[4] *= 1e-3
    a, b = head([maps, scaled])
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, head([torch.rand(6, 5, 7)])[0], atol=1e-3)  # but the maps themselves matter


def test_vision_features_reach_the_head_and_belong_to_the_phrase_image():
    torch.manual_seed(0)
    grounder = heads.Grounder(heads.MaskHead(in_channels=4, base=8, size=16, vision_channels=3)).eval()
    maps = [torch.rand(4, 3, 3) for _ in range(3)]
    vision = [torch.randn(3, 6, 6), torch.randn(3, 6, 6)]  # two images of the same size
    with torch.no_grad():
        both = grounder(frozen(maps, vision, phrase_image=[0, 1, 1]))["coarse"]
        # the features change the mask: zeroed features give another one
        zeroed = grounder(frozen(maps, [torch.zeros_like(v) for v in vision], phrase_image=[0, 1, 1]))["coarse"]
        assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(both, zeroed))
        # phrases 1 and 2 read image 1's features: the same as a batch holding image 1 alone
        alone = grounder(frozen(maps[1:], vision[1:], phrase_image=[0, 0]))["coarse"]
    assert torch.allclose(both[1], alone[0], atol=1e-5) and torch.allclose(both[2], alone[1], atol=1e-5)


def test_vision_features_of_another_size_are_an_error():
    head = heads.MaskHead(in_channels=4, base=8, size=16, vision_channels=3)
    with pytest.raises(ValueError, match=r"phrase 1 has maps \(4, 3, 5\) but vision features \(3, 6, 6\); "
                                         r"expected \(3, 6, 10\)"):
        head([torch.rand(4, 3, 3), torch.rand(4, 3, 5)], [torch.rand(3, 6, 6), torch.rand(3, 6, 6)])


def test_output_resolution_follows_token_px():
    head = heads.MaskHead(in_channels=4, base=8, size=16, token_px=32)
    assert head([torch.rand(4, 3, 5)])[0].shape == (96, 160)


@pytest.mark.parametrize("size", [(96, 160), (4, 3), (17, 9), (5, 11)])
def test_bilinear_is_f_interpolate_with_its_gradient(size):
    """The head's last upsampling (two matmuls, for a faster backward) gives F.interpolate's bilinear values and
    gradients, up- and down-sampling, at ratios that are not whole numbers."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, requires_grad=True)
    g = torch.randn(3, *size)
    ours = heads.bilinear(x, size)
    (grad,) = torch.autograd.grad((ours * g).sum(), x)
    ref = F.interpolate(x[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    (ref_grad,) = torch.autograd.grad((ref * g).sum(), x)
    assert torch.allclose(ours, ref, atol=1e-6) and torch.allclose(grad, ref_grad, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # AMP: still float32 weights and products
        amp = heads.bilinear(x, size)
    assert amp.dtype == torch.float32 and torch.allclose(amp, ref, atol=1e-6)


def test_bce_dice_per_phrase_in_phrase_order():
    """Phrases of two sizes are stacked by size inside; the terms must come back in phrase order, each equal to
    the phrase computed alone, and Dice must be ~0 for a confident correct mask, ~1 for a confident wrong one."""
    big, small = torch.zeros(8, 8), torch.zeros(4, 4)
    big[:4] = 1
    small[:, :2] = 1
    logits = [20 * (2 * big - 1), 20 * (1 - 2 * small), torch.zeros(8, 8)]  # right, wrong, unsure
    masks = [big, small, big]
    bce, dice = heads.bce_dice(logits, masks)
    for i in range(3):
        b, d = heads.bce_dice(logits[i:i + 1], masks[i:i + 1])
        assert torch.allclose(bce[i], b[0]) and torch.allclose(dice[i], d[0])
    assert dice[0] < 0.01 and dice[1] > 0.9 and 0.3 < dice[2] < 0.7
    assert bce[0] < 1e-6 and bce[1] > 10 and abs(bce[2] - torch.log(torch.tensor(2.0))) < 1e-5
    with pytest.raises(ValueError, match=r"phrase 0: logits \(8, 8\) vs mask \(4, 4\)"):
        heads.bce_dice([torch.zeros(8, 8)], [small])


def test_phrase_losses_only_supervised_phrases():
    out = dict(coarse=[torch.zeros(4, 4), torch.full((4, 4), 5.0), torch.zeros(4, 4)])
    batch = dict(masks=[torch.ones(2, 4, 4), torch.ones(1, 4, 4)], supervised=[[True, False], [True]])
    terms = heads.phrase_losses(out, batch)
    assert set(terms) == {"bce", "dice"} and terms["bce"].shape == (2,)
    assert torch.allclose(terms["bce"], torch.log(torch.tensor(2.0)).expand(2))  # the unsupervised 5.0 is out


def test_bce_dice_back_in_phrase_order_for_any_grouping():
    """Sizes A B C A B group as [0, 3] [1, 4] [2]: the order 0 3 1 4 2 is not its own inverse, so indexing with the
    order instead of its inverse (argsort) puts terms on the wrong phrases."""
    g = torch.Generator().manual_seed(0)
    sizes = [(8, 8), (4, 4), (6, 2), (8, 8), (4, 4)]
    logits = [torch.randn(s, generator=g) * 3 for s in sizes]
    masks = [(torch.rand(s, generator=g) > 0.5).float() for s in sizes]
    bce, dice = heads.bce_dice(logits, masks)
    for i in range(len(sizes)):
        b, d = heads.bce_dice(logits[i:i + 1], masks[i:i + 1])
        assert torch.allclose(bce[i], b[0]) and torch.allclose(dice[i], d[0]), i
