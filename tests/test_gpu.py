"""The CUDA path: bf16 capture against the float32 CPU result, and AMP training steps. Skipped without a GPU."""
import pytest
import torch

import head as heads
import model
import qwen_inputs as qi
from test_model import PHRASES, SIZES, make_sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_qwen(tiny_qwen):
    model_dir, _, tokenizer = tiny_qwen
    qwen, _ = model.load_qwen(model_dir, dtype=torch.bfloat16, device="cuda")
    return qwen, tokenizer


def test_bf16_capture_follows_float32(tiny_qwen, cuda_qwen):
    _, qwen32, _ = tiny_qwen
    qwen, tokenizer = cuda_qwen
    batch = qi.collate([make_sample(tokenizer, s, p, seed=i) for i, (s, p) in enumerate(zip(SIZES, PHRASES))])
    ref = model.phrase_attention(qwen32, batch)
    maps = model.phrase_attention(qwen, model.to_device(batch, "cuda"))
    for m, r in zip(maps, ref, strict=True):
        assert m.device.type == "cuda" and m.dtype == torch.float32 and m.shape == r.shape
        # bf16 weights and activations: probabilities agree to a few bf16 ulps of the largest ones
        assert (m.cpu() - r).abs().max().item() < 0.02
        assert torch.corrcoef(torch.stack([m.cpu().flatten(), r.flatten()]))[0, 1] > 0.99


def test_amp_training_steps(cuda_qwen):
    qwen, tokenizer = cuda_qwen
    batch = model.to_device(qi.collate([make_sample(tokenizer, s, p, seed=i)
                                        for i, (s, p) in enumerate(zip(SIZES, PHRASES))]), "cuda")
    text = qwen.config.text_config
    torch.manual_seed(0)
    grounder = heads.Grounder(heads.MaskHead(in_channels=text.num_hidden_layers * text.num_attention_heads, base=8,
                                             vision_channels=qwen.config.vision_config.hidden_size)).cuda()
    before = {k: v.clone() for k, v in qwen.state_dict().items()}
    optimizer = torch.optim.AdamW(grounder.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = grounder(model.frozen_outputs(qwen, batch, vision=True))
            loss = sum(heads.phrase_losses(out, batch).values()).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(v, qwen.state_dict()[k]) for k, v in before.items())
