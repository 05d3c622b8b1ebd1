"""Both step channels give the agent the arrays the master wrote, and the master what rank 0 answered."""
from __future__ import annotations

import numpy as np
import pytest

from llmserve.common.channel import InlineChannel, SharedMemoryChannel
from llmserve.common.protocol import ProtocolError, StepRequest
from llmserve.common.sampling import SamplingParams
from llmserve.common.step_arrays import StepCapacity, write_sequence_params

CAPACITY = StepCapacity(max_num_tokens=8, max_num_seqs=2, max_blocks_per_seq=4, history_capacity=16, topk_width=2)


def write_step(inputs: dict, buffer: int) -> StepRequest:
    inputs["input_ids"][:3] = [7, 8, 9]
    inputs["query_lens"][0], inputs["seq_ids"][0] = 3, 41
    write_sequence_params(inputs, 0, 41, SamplingParams(repetition_penalty=1.2), 2)
    inputs["history_counts"][0], inputs["history_ids"][:3] = 3, [7, 8, 9]
    inputs["logits_indices"][0] = 2
    return StepRequest(5, num_tokens=3, num_seqs=1, num_sample=1, num_new_blocks=0, is_all_greedy=True, buffer=buffer,
                       num_new_params=1, num_history_ids=3)


@pytest.mark.parametrize("kind", ["shared_memory", "inline"])
def test_a_step_and_its_answer_cross_the_channel_in_either_buffer(kind):
    master = SharedMemoryChannel.create(CAPACITY) if kind == "shared_memory" else InlineChannel(CAPACITY)
    agent = SharedMemoryChannel.attach(CAPACITY, *master.segment_names) if kind == "shared_memory" else InlineChannel(CAPACITY)
    try:
        for buffer in (1, 0):
            header = write_step(master.inputs[buffer], buffer)
            inputs, outputs = agent.step_arrays(header, master.request_frames(header))
            assert inputs["input_ids"][:3].tolist() == [7, 8, 9] and inputs["seq_ids"][0] == 41
            assert inputs["history_ids"][:3].tolist() == [7, 8, 9] and inputs["param_seq_ids"][0] == 41
            assert inputs["repetition_penalty"][0] == np.float32(1.2)
            outputs["sampled_ids"][0] = 100 + buffer
            master.take_reply(header, agent.reply_frames(header))
            assert master.outputs[buffer]["sampled_ids"][0] == 100 + buffer
    finally:
        agent.close()
        master.close()


def test_frames_that_do_not_fit_their_channel_are_refused():
    master = SharedMemoryChannel.create(CAPACITY)
    try:
        header = write_step(master.inputs[0], 0)
        with pytest.raises(ProtocolError, match="shared memory"):
            master.step_arrays(header, [np.zeros(3).tobytes()])
        with pytest.raises(ValueError, match="1 input and 2 output buffers"):
            SharedMemoryChannel.attach(CAPACITY, master.segment_names[0][:1], master.segment_names[1])
        assert master.outputs[0]["sampled_step"][0] == -1  # no step's sampled ids yet
    finally:
        master.close()
    inline = InlineChannel(CAPACITY)
    header = write_step(inline.inputs[0], 0)
    with pytest.raises(ProtocolError, match="do not fit the layout"):
        inline.step_arrays(header, inline.request_frames(header)[:-1])
