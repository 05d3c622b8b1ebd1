"""tools/quant_accuracy's metrics: KL of next-token distributions, abs logit error and top-1 agreement."""
from __future__ import annotations

import math

import pytest
import torch

from llmserve.tools.quant_accuracy import compare_logits, position_errors, summarize, text_windows


def random_logits(positions: int = 8, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(positions, vocab, generator=torch.Generator().manual_seed(seed))


def test_identical_logits_have_no_error_and_agree_everywhere():
    logits = random_logits()
    m = compare_logits(logits, logits.clone())
    assert m["kl_mean"] == m["kl_p99"] == m["kl_max"] == 0.0
    assert m["max_abs_error"] == m["mean_abs_error"] == 0.0
    assert m["top1_agreement"] == 1.0 and m["positions"] == 8


def test_kl_and_errors_match_a_hand_computed_example():
    ln3, ln7 = math.log(3), math.log(7)
    reference = torch.tensor([[ln3, 0.0], [ln3, 0.0]])  # P = (3/4, 1/4) at both positions
    candidate = torch.tensor([[0.0, ln3], [ln7, 0.0]])  # Q = (1/4, 3/4), then (7/8, 1/8)
    kl_first = 0.75 * math.log(3) + 0.25 * math.log(1 / 3)
    kl_second = 0.75 * math.log(0.75 / 0.875) + 0.25 * math.log(0.25 / 0.125)
    m = compare_logits(reference, candidate)
    assert m["kl_mean"] == pytest.approx((kl_first + kl_second) / 2, rel=1e-6)
    assert m["kl_max"] == pytest.approx(kl_first, rel=1e-6)
    assert m["kl_p99"] == pytest.approx(kl_second + 0.99 * (kl_first - kl_second), rel=1e-6)
    assert m["top1_agreement"] == 0.5
    assert m["max_abs_error"] == pytest.approx(ln3, rel=1e-6)
    assert m["mean_abs_error"] == pytest.approx((2 * ln3 + math.log(7 / 3)) / 4, rel=1e-6)
    assert m["ref_entropy_mean"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), rel=1e-6)


def test_shifting_every_logit_changes_the_error_but_not_the_distribution():
    logits = random_logits()
    m = compare_logits(logits, logits + 5.0)
    assert m["max_abs_error"] == pytest.approx(5.0) and m["mean_abs_error"] == pytest.approx(5.0)
    assert m["kl_max"] == pytest.approx(0.0, abs=1e-12)
    assert m["top1_agreement"] == 1.0


def test_a_swapped_argmax_lowers_agreement_and_raises_kl():
    reference = random_logits(positions=4)
    candidate = reference.clone()
    for row in (0, 1):  # swap the top logit with the lowest one
        top, bottom = int(reference[row].argmax()), int(reference[row].argmin())
        candidate[row, top], candidate[row, bottom] = reference[row, bottom], reference[row, top]
    m = compare_logits(reference, candidate)
    assert m["top1_agreement"] == 0.5
    assert m["kl_max"] > 0.1 and m["kl_mean"] > 0


def test_metrics_of_sequences_measured_apart_equal_those_of_all_at_once():
    reference, candidate = random_logits(positions=12), random_logits(positions=12, seed=1)
    pieces = [position_errors(reference[i:i + 4], candidate[i:i + 4]) for i in range(0, 12, 4)]
    whole = compare_logits(reference, candidate)
    assert summarize(pieces) == pytest.approx(whole, rel=1e-12)


def test_text_windows_are_consecutive_and_do_not_overlap():
    windows = text_windows(list(range(10)), num_windows=3, length=3)
    assert windows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_text_too_short_for_the_windows_asked_is_an_error():
    with pytest.raises(ValueError, match="fewer than 4 windows of 3"):
        text_windows(list(range(10)), num_windows=4, length=3)
