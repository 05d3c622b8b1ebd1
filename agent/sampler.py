"""Picks the next token of every sampled row in one vectorised call.

Rows with temperature 0 are greedy. Others are scaled by temperature, filtered
by top-k and top-p, and drawn with the exponential-race trick
(argmax(p / E), E ~ Exp(1)), which lets seeded rows use their own noise.
"""
from __future__ import annotations

import numpy as np
import torch

from common.step_arrays import NO_SEED


class Sampler:
    """Greedy, temperature, top-k, top-p and per-request seeds, batched."""

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,  # [rows, vocab] float32
        temperature: np.ndarray,
        top_k: np.ndarray,
        top_p: np.ndarray,
        seeds: np.ndarray,
        seed_offsets: np.ndarray,
        is_all_greedy: bool,
    ) -> torch.Tensor:
        greedy_ids = logits.argmax(dim=-1)
        if is_all_greedy:
            return greedy_ids
        temperature_t = torch.from_numpy(temperature).to(self.device)
        is_greedy = temperature_t == 0
        scaled = logits / torch.where(is_greedy, 1.0, temperature_t).unsqueeze(1)
        scaled = self._filter(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)
        noise = self._exponential_noise(probs.shape, seeds, seed_offsets)
        sampled_ids = (probs / noise).argmax(dim=-1)
        return torch.where(is_greedy, greedy_ids, sampled_ids)

    def _filter(self, logits: torch.Tensor, top_k: np.ndarray, top_p: np.ndarray) -> torch.Tensor:
        """Mask tokens outside each row's top-k and top-p sets with -inf."""
        vocab = logits.shape[-1]
        wants_top_k = bool((top_k > 0).any()) and bool((top_k < vocab).any())
        wants_top_p = bool((top_p < 1.0).any())
        if not (wants_top_k or wants_top_p):
            return logits
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if wants_top_k:
            k = torch.from_numpy(top_k).to(logits.device, torch.int64)
            k = torch.where(k > 0, k, vocab).unsqueeze(1)
            drop |= torch.arange(vocab, device=logits.device).unsqueeze(0) >= k
        if wants_top_p:
            p = torch.from_numpy(top_p).to(logits.device).unsqueeze(1)
            probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            drop |= mass_before >= p  # keeps the smallest prefix whose mass reaches p, at least one token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(-1, order, sorted_logits)

    def _exponential_noise(self, shape: torch.Size, seeds: np.ndarray, seed_offsets: np.ndarray) -> torch.Tensor:
        noise = torch.empty(shape, device=self.device).exponential_(generator=self.generator)
        for row in np.flatnonzero(seeds != NO_SEED):
            generator = torch.Generator(device=self.device)
            generator.manual_seed(_row_seed(int(seeds[row]), int(seed_offsets[row])))
            noise[row].exponential_(generator=generator)
        return noise


def _row_seed(seed: int, offset: int) -> int:
    """A draw depends only on the request's seed and how many tokens it has generated."""
    return (seed * 1_000_003 + offset) % (2**63 - 1)
