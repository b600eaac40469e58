"""Shared fixtures: a tiny random Qwen2.5-VL and its tokenizer, built offline once per test session."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models on 2 shared cores: 1 thread is faster and steadier

import model  # noqa: E402
import synthetic  # noqa: E402

# What the tokenizer is trained on: the chat scaffolding and a small referring vocabulary.
TEXTS = ["You are a helpful assistant.", "Please describe the objects in this image.",
         "the red circle on the left", "a big blue square at the top", "small green triangle, right",
         "the yellow star below the purple hexagon", "man holding a dog in the park next to two trees",
         "zebra; the person in white. 0123456789 (left) [top] {x}"] * 10


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """(model_dir, qwen, tokenizer): float32 on the CPU, 4 layers x 4 heads over 2 kv heads, hidden 128."""
    model_dir = str(tmp_path_factory.mktemp("tiny_qwen"))
    synthetic.build_tiny_qwen(model_dir, TEXTS, seed=0)
    qwen, tokenizer = model.load_qwen(model_dir, dtype=torch.float32, device="cpu")
    return model_dir, qwen, tokenizer
