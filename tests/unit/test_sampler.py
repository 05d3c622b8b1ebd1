"""The sampler: greedy rows, top-k/top-p support, and seeds that ignore the rest of the batch."""
from __future__ import annotations

import os

import numpy as np
import torch

from agent.sampler import Sampler
from common.step_arrays import NO_SEED

DEVICE = torch.device(os.environ.get("LLMSERVE_TEST_DEVICE", "cpu"))  # LLMSERVE_TEST_DEVICE=cuda on a GPU machine


def sample(sampler, logits, temperature, top_k=None, top_p=None, seeds=None, offsets=None):
    rows = logits.shape[0]
    return sampler(
        logits.to(DEVICE),
        np.asarray(temperature, np.float32),
        np.asarray(top_k if top_k is not None else [0] * rows, np.int32),
        np.asarray(top_p if top_p is not None else [1.0] * rows, np.float32),
        np.asarray(seeds if seeds is not None else [NO_SEED] * rows, np.int64),
        np.asarray(offsets if offsets is not None else [0] * rows, np.int64),
        is_all_greedy=all(t == 0 for t in temperature),
    ).cpu()


def test_greedy_rows_take_the_argmax_even_in_a_mixed_batch():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    ids = sample(Sampler(DEVICE), logits, [0, 1.0, 0, 2.0])
    assert ids[0] == logits[0].argmax() and ids[2] == logits[2].argmax()


def test_top_k_restricts_draws_to_the_k_most_likely_tokens():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(1)).repeat(400, 1)
    ids = sample(Sampler(DEVICE), logits, [1.0] * 400, top_k=[3] * 400)
    assert set(ids.tolist()) <= set(logits[0].topk(3).indices.tolist())
    assert len(set(ids.tolist())) == 3


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(500, 1)
    ids = sample(Sampler(DEVICE), logits, [1.0] * 500, top_p=[0.7] * 500)
    assert set(ids.tolist()) == {0, 1}


def test_draw_frequencies_follow_the_softmax():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(6000, 1)
    ids = sample(Sampler(DEVICE, seed=3), logits, [1.0] * 6000)
    freq = torch.bincount(ids, minlength=3).float() / 6000
    assert torch.allclose(freq, probs, atol=0.03)


def test_seeded_row_gives_the_same_token_whatever_else_is_in_the_batch():
    gen = torch.Generator().manual_seed(2)
    row = torch.randn(1, 1000, generator=gen)
    alone = sample(Sampler(DEVICE, seed=10), row, [1.0], seeds=[1234], offsets=[7])
    crowd = torch.cat([torch.randn(5, 1000, generator=gen), row])
    busy = sample(Sampler(DEVICE, seed=99), crowd, [1.0] * 6, seeds=[NO_SEED] * 5 + [1234], offsets=[0] * 5 + [7])
    assert alone[0] == busy[5]
