"""The sampler: greedy rows, top-k/top-p support, and seeds that ignore the rest of the batch."""
from __future__ import annotations

import os

import torch

from llmserve.agent.sampler import Sampler
from llmserve.common.sampling import SamplingParams
from tests.sampling_rows import make_rows

DEVICE = torch.device(os.environ.get("LLMSERVE_TEST_DEVICE", "cpu"))  # LLMSERVE_TEST_DEVICE=cuda on a GPU machine


def sample(sampler, logits, params, **rows):
    batch, is_all_greedy = make_rows(params, **rows)
    return sampler(logits.to(DEVICE), batch, is_all_greedy).sampled_ids.cpu()


def sampled(temperature=1.0, **overrides) -> SamplingParams:
    return SamplingParams(do_sample=True, temperature=temperature, **overrides)


def test_greedy_rows_take_the_argmax_even_in_a_mixed_batch():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    ids = sample(Sampler(DEVICE), logits, [SamplingParams(), sampled(), SamplingParams(), sampled(2.0)])
    assert ids[0] == logits[0].argmax() and ids[2] == logits[2].argmax()


def test_top_k_restricts_draws_to_the_k_most_likely_tokens():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(1)).repeat(400, 1)
    ids = sample(Sampler(DEVICE), logits, [sampled(top_k=3)] * 400)
    assert set(ids.tolist()) <= set(logits[0].topk(3).indices.tolist())
    assert len(set(ids.tolist())) == 3


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(500, 1)
    ids = sample(Sampler(DEVICE), logits, [sampled(top_p=0.7)] * 500)
    assert set(ids.tolist()) == {0, 1}


def test_draw_frequencies_follow_the_softmax():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(6000, 1)
    ids = sample(Sampler(DEVICE, seed=3), logits, [sampled()] * 6000)
    freq = torch.bincount(ids, minlength=3).float() / 6000
    assert torch.allclose(freq, probs, atol=0.03)


def test_seeded_row_gives_the_same_token_whatever_else_is_in_the_batch():
    gen = torch.Generator().manual_seed(2)
    row = torch.randn(1, 1000, generator=gen)
    history = list(range(8))  # a 1-token prompt and 7 generated tokens
    alone = sample(Sampler(DEVICE, seed=10), row, [sampled(seed=1234)], histories=[history], prompt_lens=[1])
    crowd = torch.cat([torch.randn(5, 1000, generator=gen), row])
    busy = sample(
        Sampler(DEVICE, seed=99), crowd, [sampled()] * 5 + [sampled(seed=1234)], histories=[[0]] * 5 + [history],
        prompt_lens=[1] * 6,
    )
    assert alone[0] == busy[5]
