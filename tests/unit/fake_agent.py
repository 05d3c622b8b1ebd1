"""An in-process stand-in for the agent: the 'model' answers last token + 1."""
from __future__ import annotations

from llmserve.common.config import Config, config_from_dict
from llmserve.common.model_info import ModelInfo
from llmserve.common.protocol import AgentReady, StepRequest, StepResult
from llmserve.common.step_arrays import step_inputs
from llmserve.master.agent_client import InProcessTransport
from llmserve.master.engine import Engine
from llmserve.master.launcher import step_capacity
from llmserve.master.tokenizer import build_builtin_tokenizer

VOCAB = 1024
TOKENIZER = build_builtin_tokenizer()


def fake_prompt_logprob(token_id: int) -> float:
    """The log-probability the fake model gives a prompt token (any position)."""
    return -float(token_id % 7) - 0.5


def counting_step(header: StepRequest, inputs: dict, outputs: dict) -> StepResult:
    batch = step_inputs(inputs, header, suppress_width=1)  # the fake model ignores the sampling rows
    last_tokens = batch.input_ids[batch.logits_indices]
    outputs["sampled_ids"][: header.num_sample] = (last_tokens + 1) % VOCAB
    scored, targets = header.num_prompt_positions, batch.prompt_targets
    outputs["prompt_logprobs"][:scored] = -(targets % 7) - 0.5
    outputs["prompt_ranks"][:scored] = 1
    width = len(outputs["prompt_topk_ids"]) // len(outputs["prompt_logprobs"])
    outputs["prompt_topk_ids"][: scored * width].reshape(scored, width)[:, 0] = targets
    outputs["prompt_topk_logprobs"][: scored * width].reshape(scored, width)[:, 0] = -(targets % 7) - 0.5
    return StepResult(header.step_id, 0, {"predict": 0.1})


def fake_config(**scheduler) -> Config:
    return config_from_dict(
        {
            "model_config": {"load_format": "dummy", "dummy_config": {"vocab_size": VOCAB}, "tokenizer_path": "builtin"},
            "pa_config": {"num_blocks": 64, "block_size": 4},
            "scheduler_config": scheduler,
        }
    )


def fake_engine(config: Config = None, max_seq_len: int = 128, step_fn=counting_step) -> Engine:
    config = config or fake_config()
    info = ModelInfo(vocab_size=VOCAB, max_seq_len=max_seq_len, eos_token_ids=(2,), bos_token_id=1, pad_token_id=0)
    ready = AgentReady(0, 0, VOCAB, 1, config.pa_config.num_blocks, config.pa_config.block_size, "float32", "cpu")
    transport = InProcessTransport(step_capacity(config, max_seq_len, 1, VOCAB), step_fn, ready)
    return Engine(config, TOKENIZER, info, transport)
