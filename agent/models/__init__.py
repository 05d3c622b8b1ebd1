"""Model classes by the `architectures` name of a checkpoint's config.json."""
from __future__ import annotations

from torch import nn

from llmserve.agent.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def model_class(hf_config: dict) -> type[nn.Module]:
    """The class implementing the config's architecture; a ValueError names it when none does."""
    architectures = hf_config.get("architectures") or []
    for name in architectures:
        if name in MODEL_CLASSES:
            return MODEL_CLASSES[name]
    raise ValueError(
        f"unsupported model architecture {', '.join(architectures) or '(config.json names none)'}; "
        f"supported: {', '.join(MODEL_CLASSES)}"
    )
