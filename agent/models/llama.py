"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a paged KV cache; weight names match Hugging Face's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from llmserve.agent.layers.attention import KVCache, PagedAttention, StepAttention
from llmserve.agent.layers.norm import RMSNorm
from llmserve.agent.layers.quantization import checkpoint_grid, merged_grid
from llmserve.agent.layers.activation import SiluAndMul
from llmserve.agent.layers.rotary import Rope, RotaryEmbedding, rope_parameters

QKV_BIAS_ARCHITECTURES = {"Qwen2ForCausalLM"}


@dataclass(frozen=True)
class DecoderConfig:
    """The decoder's shape, read once from a Hugging Face config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    has_qkv_bias: bool
    has_o_bias: bool
    has_mlp_bias: bool
    tie_word_embeddings: bool
    rope: dict
    sliding_windows: tuple[Optional[int], ...]  # per layer; None attends to the whole context

    @classmethod
    def from_hf(cls, hf_config: dict) -> "DecoderConfig":
        activation = hf_config.get("hidden_act", "silu")
        if activation not in ("silu", "swish"):
            raise ValueError(f"hidden_act {activation!r} is not supported; the Llama MLP needs 'silu'")
        num_heads = hf_config["num_attention_heads"]
        num_layers = hf_config["num_hidden_layers"]
        has_attention_bias = bool(hf_config.get("attention_bias", False))
        is_qkv_bias_architecture = bool(QKV_BIAS_ARCHITECTURES & set(hf_config.get("architectures") or []))
        return cls(
            vocab_size=hf_config["vocab_size"],
            hidden_size=hf_config["hidden_size"],
            intermediate_size=hf_config["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
            head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // num_heads,
            rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
            has_qkv_bias=has_attention_bias or is_qkv_bias_architecture,
            has_o_bias=has_attention_bias,
            has_mlp_bias=bool(hf_config.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            rope=rope_parameters(hf_config),
            sliding_windows=_sliding_windows(hf_config, num_layers),
        )


def _sliding_windows(hf_config: dict, num_layers: int) -> tuple[Optional[int], ...]:
    """Mistral slides every layer; Qwen2 only with use_sliding_window, on the layers its layer_types name."""
    window = hf_config.get("sliding_window")
    if not window or hf_config.get("use_sliding_window") is False:
        return (None,) * num_layers
    if hf_config.get("layer_types"):
        return tuple(window if kind == "sliding_attention" else None for kind in hf_config["layer_types"])
    if "max_window_layers" in hf_config:
        return tuple(window if i >= hf_config["max_window_layers"] else None for i in range(num_layers))
    return (window,) * num_layers


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions, reading and writing the paged KV cache."""

    def __init__(self, config: DecoderConfig, sliding_window: Optional[int]):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.q_size, bias=config.has_qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_size, bias=config.has_qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_size, bias=config.has_qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.has_o_bias)
        self.attn = PagedAttention(config.num_heads, config.num_kv_heads, config.head_dim, sliding_window)

    def merge_projections(self) -> None:
        """Once the weights are loaded: q, k and v in one matmul."""
        self.qkv_proj = merged_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, hidden: torch.Tensor, rope: Rope, kv_cache: KVCache, attention: StepAttention) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = rope(q.view(num_tokens, self.num_heads, self.head_dim), k.view(num_tokens, self.num_kv_heads, self.head_dim))
        out = self.attn(q, k, v.view(num_tokens, self.num_kv_heads, self.head_dim), kv_cache, attention)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.has_mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.has_mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.has_mlp_bias)
        self.act = SiluAndMul()

    def merge_projections(self) -> None:
        """Once the weights are loaded: gate and up in one matmul."""
        self.gate_up_proj = merged_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(hidden)))


class DecoderLayer(nn.Module):
    """Pre-norm block: hidden + attention(norm(hidden)), then hidden + mlp(norm(hidden)).

    The residual stream travels beside the block's output, so each norm also adds it (RMSNorm's fused form).
    """

    def __init__(self, config: DecoderConfig, sliding_window: Optional[int]):
        super().__init__()
        self.self_attn = Attention(config, sliding_window)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, hidden: torch.Tensor, residual: Optional[torch.Tensor], rope: Rope, kv_cache: KVCache,
        attention: StepAttention,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this block's output, the residual stream before it); add them for the block's full output."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rope, kv_cache, attention)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Token embedding, the decoder layers, and the final norm."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, window) for window in config.sliding_windows)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], attention: StepAttention
    ) -> torch.Tensor:
        """input_ids, positions [num_tokens] -> hidden [num_tokens, hidden_size]."""
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb(positions, hidden.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, rope, kv_cache, attention)
        return self.norm(hidden, residual)[0]


def merged_linear(*linears: nn.Linear) -> nn.Linear:
    """One linear layer computing the given ones side by side (their outputs concatenated)."""
    first = linears[0]
    merged = nn.Linear(first.in_features, sum(l.out_features for l in linears), bias=first.bias is not None,
                       device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        merged.weight.copy_(torch.cat([l.weight for l in linears]))
        if first.bias is not None:
            merged.bias.copy_(torch.cat([l.bias for l in linears]))
    merged.requires_grad_(False)
    grid = merged_grid([checkpoint_grid(l) for l in linears])
    if grid is not None:  # a pre-quantized checkpoint's grids follow the rows
        merged.weight.checkpoint_grid = grid
    return merged


class LlamaForCausalLM(nn.Module):
    """The decoder with its language-model head."""

    def __init__(self, hf_config: dict):
        super().__init__()
        self.config = DecoderConfig.from_hf(hf_config)
        self.model = LlamaModel(self.config)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)

    def merge_projections(self) -> None:
        """Once the weights are loaded (by their Hugging Face names): qkv and gate_up matmuls, one each."""
        for layer in self.model.layers:
            layer.self_attn.merge_projections()
            layer.mlp.merge_projections()

    @property
    def tied_weights(self) -> dict[str, str]:
        """Parameters that share another's tensor instead of having their own: {name: source name}."""
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], attention: StepAttention
    ) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden_size]; logits are computed only for the rows that need them."""
        return self.model(input_ids, positions, kv_caches, attention)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [num_rows, hidden_size] -> logits [num_rows, vocab_size]."""
        return self.lm_head(hidden)
