"""Tensor-parallel shards, their validation, the config keys, and the inline transport's framing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmserve.agent.tensor_parallel import Shard, local_config, shard_weight
from llmserve.common.config import config_from_dict
from llmserve.common.errors import ConfigError
from llmserve.common.model_info import check_tensor_parallel
from llmserve.common.protocol import StepRequest
from llmserve.common.step_arrays import StepCapacity, input_layout, input_lengths, pack_arrays, step_inputs, unpack_arrays

HF = {"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 96}


def shards(name: str, full: torch.Tensor, world: int) -> list[torch.Tensor]:
    return [shard_weight(name, full, HF, Shard(rank, world)) for rank in range(world)]


def test_column_parallel_shards_split_output_rows_and_row_parallel_shards_split_input_columns():
    q = torch.randn(8 * 8, 64)
    down = torch.randn(64, 96)
    assert torch.equal(torch.cat(shards("model.layers.0.self_attn.q_proj.weight", q, 2)), q)
    assert torch.equal(torch.cat(shards("model.layers.0.mlp.down_proj.weight", down, 2), dim=1), down)
    embed = torch.randn(10, 64)
    assert all(s is embed for s in shards("model.embed_tokens.weight", embed, 2))  # replicated


def test_row_parallel_bias_is_added_by_rank_zero_only():
    bias = torch.randn(64)
    first, second = shards("model.layers.0.self_attn.o_proj.bias", bias, 2)
    assert torch.equal(first, bias) and torch.equal(second, torch.zeros(64))


def test_kv_heads_are_replicated_when_ranks_outnumber_them():
    k = torch.arange(2 * 8 * 64, dtype=torch.float32).view(2 * 8, 64)  # 2 KV heads of head_dim 8
    per_rank = shards("model.layers.0.self_attn.k_proj.weight", k, 4)
    heads = k.chunk(2)
    assert [torch.equal(s, heads[r // 2]) for r, s in enumerate(per_rank)] == [True] * 4
    assert local_config(HF, Shard(1, 4))["num_key_value_heads"] == 1
    assert local_config(HF, Shard(1, 4))["num_attention_heads"] == 2
    assert local_config(HF, Shard(1, 4))["head_dim"] == 8  # kept from the full model


@pytest.mark.parametrize("world, problem", [(3, "attention heads"), (16, "attention heads")])
def test_ranks_must_divide_the_heads(world, problem):
    with pytest.raises(ValueError, match=problem):
        check_tensor_parallel(HF, world)


def test_ranks_must_divide_or_multiply_the_kv_heads():
    with pytest.raises(ValueError, match="KV heads"):
        check_tensor_parallel({**HF, "num_key_value_heads": 3, "num_attention_heads": 12}, 2)
    check_tensor_parallel(HF, 4)  # 2 KV heads, each on two ranks


def serving(**values):
    return config_from_dict({
        "model_config": {"load_format": "dummy", "dummy_config": {"vocab_size": 8}},
        "serving_config": values,
    }).serving_config


def test_tensor_parallel_size_with_one_port_uses_consecutive_ports():
    assert serving(tensor_parallel_size=3, agent_ports=[9000], server_port=8000).agent_ports == [9000, 9001, 9002]
    assert serving(tensor_parallel_size=2).agent_ports == [8836, 8837]  # the defaults do not collide with dist_port


def test_agents_on_several_hosts_need_the_inline_transport_and_hand_started_agents():
    hosts = {"agent_ports": [9000, 9000], "agent_hosts": ["10.0.0.1", "10.0.0.2"]}
    with pytest.raises(ConfigError, match="transport: inline and launch_agents: false"):
        serving(**hosts)
    assert serving(**hosts, transport="inline", launch_agents=False).agent_host(1) == "10.0.0.2"


@pytest.mark.parametrize(
    "values, problem",
    [
        ({"tensor_parallel_size": 3, "agent_ports": [9000, 9001]}, "3 ranks but 2 agent_ports"),
        ({"agent_ports": [9000, 9000]}, "twice"),
        ({"agent_ports": [9000, 9001], "dist_port": 9001}, "dist_port"),
        ({"transport": "carrier-pigeon"}, "transport"),
        ({"agent_ports": [9000, 9001], "agent_hosts": [1, 2]}, "host names"),
        ({"agent_ports": [9000, 9001], "agent_hosts": ["a"]}, "one per rank"),
    ],
)
def test_bad_tensor_parallel_settings_name_the_key(values, problem):
    with pytest.raises(ConfigError, match=problem):
        serving(**values)


def test_inline_frames_carry_exactly_the_rows_a_step_reads():
    capacity = StepCapacity(max_num_tokens=16, max_num_seqs=4, max_blocks_per_seq=3, history_capacity=32, suppress_width=2)
    layout = input_layout(capacity)
    arrays = {name: (np.arange(n) % 2 if dtype is np.bool_ else np.arange(n)).astype(dtype) for name, dtype, n in layout}
    header = StepRequest(step_id=1, num_tokens=5, num_seqs=2, num_sample=2, num_new_blocks=3, is_all_greedy=True,
                         num_block_copies=1, num_new_params=1, num_history_ids=12)
    frames = [bytes(frame) for frame in pack_arrays(arrays, layout, input_lengths(header, 2))]
    received = unpack_arrays(frames, layout)
    assert len(received["history_ids"]) == 12 and len(received["input_ids"]) == 5 and len(received["temperature"]) == 1
    here, there = step_inputs(arrays, header, 2), step_inputs(received, header, 2)
    for field in ("input_ids", "positions", "slot_mapping", "seq_ids", "new_block_ids", "block_copies", "logits_indices",
                  "row_seqs", "suppress_ids", "history_starts", "history_counts", "history_ids"):
        assert np.array_equal(getattr(here, field), getattr(there, field)), field
    for field in ("param_seq_ids", "temperature", "seeds", "keeps_history"):
        assert np.array_equal(getattr(here.params, field), getattr(there.params, field)), field
