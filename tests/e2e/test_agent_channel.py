"""The master <-> agent channel: only the master's CURVE key gets in, and no frame, however bad, ends an agent."""
from __future__ import annotations

import subprocess
import sys
from typing import Optional

import msgpack
import numpy as np
import psutil
import pytest
import yaml
import zmq

from llmserve.common.agent_keys import ChannelKeys, load_keys
from llmserve.common.protocol import (
    PROTOCOL_VERSION, AgentReady, InitAgent, Shutdown, StepMasks, StepRequest, StepResult, decode, encode,
)
from llmserve.common.sampling import SamplingParams
from llmserve.common.step_arrays import (
    StepCapacity, input_layout, input_lengths, output_layout, pack_arrays, unpack_arrays, write_sequence_params,
)
from tests.conftest import ROOT
from tests.e2e.server import TINY_LLAMA, write_config

CAPACITY = StepCapacity(max_num_tokens=8, max_num_seqs=2, max_blocks_per_seq=4, history_capacity=16, topk_width=2,
                        suppress_width=2, mask_width=TINY_LLAMA["vocab_size"] // 32)
NUM_BLOCKS = 256  # write_config's pool
REPLY_TIMEOUT_MS = 20_000  # the first answer waits for the model to load


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """An agent started by hand (as on another host) with keys from `llmserve keys`; yields (address, keys dir)."""
    tmp_path = tmp_path_factory.mktemp("agent-channel")
    keys_dir = tmp_path / "keys"
    made = subprocess.run([sys.executable, "-m", "llmserve", "keys", str(keys_dir)], cwd=ROOT, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert oct((keys_dir / "agent.key_secret").stat().st_mode & 0o777) == "0o600"
    config = write_config(tmp_path, serving_config={"launch_agents": False, "agent_keys_dir": str(keys_dir)})
    port = yaml.safe_load(open(config))["serving_config"]["agent_ports"][0]
    command = [sys.executable, "-m", "llmserve", "agent", "--config", config, "--rank", "0", "--cpus", "0"]
    process = subprocess.Popen(command, cwd=ROOT)
    try:
        yield process, f"tcp://127.0.0.1:{port}", str(keys_dir)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def dealer(context: zmq.Context, address: str, keys: Optional[ChannelKeys]) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDTIMEO, 1000)
    if keys is not None:
        socket.curve_secretkey, socket.curve_publickey, socket.curve_serverkey = keys.secret, keys.public, keys.peer_public
    socket.connect(address)
    return socket


def reply(socket: zmq.Socket, frames: list, timeout_ms: int = 1500) -> Optional[list[bytes]]:
    """Send `frames`; the answer's frames, or None when the agent dropped the message (or the connection)."""
    try:
        socket.send_multipart(frames)
    except zmq.Again:  # no connection to queue it on: the agent refused the handshake
        return None
    if not socket.poll(timeout_ms):
        return None
    return socket.recv_multipart()


def one_token_step(step_id: int, slot: int = 0, token: int = 5, follows: int = -1, masks_follow: bool = False) -> list:
    """A real one-token prefill as the inline transport sends it: header, then the used rows of every input array.
    `token` -1 - r with `follows`: row r of that step's sampled ids (overlapped scheduling). `masks_follow`: its
    row is constrained, and its mask comes in a StepMasks message."""
    arrays = {name: np.zeros(n, dtype) for name, dtype, n in input_layout(CAPACITY)}
    arrays["input_ids"][0], arrays["slot_mapping"][0] = token, slot
    arrays["query_lens"][0] = arrays["context_lens"][0] = 1
    arrays["seq_ids"][0], arrays["block_counts"][0] = step_id, 1  # a new sequence each step, in block 0
    write_sequence_params(arrays, 0, step_id, SamplingParams(), 1)
    header = StepRequest(step_id, num_tokens=1, num_seqs=1, num_sample=1, num_new_blocks=1, is_all_greedy=True,
                         follows_step=follows, num_new_params=1, masked_rows=[0] if masks_follow else [],
                         mask_width=CAPACITY.mask_width if masks_follow else 0, masks_follow=masks_follow)
    return [encode(header), *pack_arrays(arrays, input_layout(CAPACITY), input_lengths(header, CAPACITY.suppress_width))]


def step_error(frames: Optional[list[bytes]]) -> Optional[str]:
    assert frames is not None, "the agent did not answer a step"
    result = decode(frames[0])
    assert isinstance(result, StepResult)
    return result.error


INIT = InitAgent(input_shms=[], output_shms=[], **vars(CAPACITY))
GARBAGE = [
    b"",
    b"\xc1",  # a byte msgpack never uses
    b"not msgpack at all",
    encode(StepRequest(1, 1, 1, 1, 1, True))[:-2],  # truncated
    encode(Shutdown()) + b"\x00",  # extra data after a message (killed the agent before)
    msgpack.packb([3, 1, 1, 1, 1, 1, True]),  # the unversioned protocol
    msgpack.packb([PROTOCOL_VERSION, 99]),  # unknown tag
    msgpack.packb([PROTOCOL_VERSION, StepRequest.TAG, "one", 1, 1, 1, 1, True]),  # wrong field type
    msgpack.packb([PROTOCOL_VERSION, StepRequest.TAG, 1]),  # too few fields
    msgpack.packb({"tag": 3}),
    b"\x91" * 100_000 + b"\x00",  # nested a hundred thousand lists deep
]


def test_strangers_without_the_master_key_get_nothing(agent):  # runs first: the agent has not met its master yet
    process, address, keys_dir = agent
    context = zmq.Context()
    try:
        plain = dealer(context, address, None)
        agent_public = load_keys(keys_dir, "master").peer_public
        stranger_public, stranger_secret = zmq.curve_keypair()  # even knowing the agent's public key
        curve_stranger = dealer(context, address, ChannelKeys(stranger_public, stranger_secret, agent_public))
        for socket in (plain, curve_stranger):
            assert reply(socket, [encode(INIT)], timeout_ms=3000) is None
            assert reply(socket, [encode(Shutdown())]) is None
        assert process.poll() is None
        master = dealer(context, address, load_keys(keys_dir, "master"))
        assert "before InitAgent" in step_error(reply(master, one_token_step(1), REPLY_TIMEOUT_MS))
        assert {psutil.Process(thread.id).cpu_affinity()[0] for thread in psutil.Process(process.pid).threads()} == {0}
    finally:
        context.destroy(linger=0)


def test_no_frame_ends_the_agent_and_bad_steps_are_refused_one_by_one(agent):
    process, address, keys_dir = agent
    context = zmq.Context()
    try:
        master = dealer(context, address, load_keys(keys_dir, "master"))
        for frame in GARBAGE:
            assert reply(master, [frame], timeout_ms=300) is None, frame[:20]
        assert reply(master, [encode(AgentReady(0, 0, 1, 1, 1, 1, "float32", "cpu"))], timeout_ms=300) is None
        assert isinstance(decode(reply(master, [encode(INIT)], REPLY_TIMEOUT_MS)[0]), AgentReady)

        too_big = StepRequest(2, num_tokens=10**6, num_seqs=1, num_sample=1, num_new_blocks=1, is_all_greedy=True)
        assert "num_tokens" in step_error(reply(master, [encode(too_big)]))
        assert "do not fit the layout" in step_error(reply(master, one_token_step(3)[:4]))
        assert "slot_mapping" in step_error(reply(master, one_token_step(4, slot=-1)))
        assert "slot_mapping" in step_error(reply(master, one_token_step(5, slot=NUM_BLOCKS * 8)))

        answer = reply(master, one_token_step(6), REPLY_TIMEOUT_MS)
        assert step_error(answer) is None
        sampled = unpack_arrays(answer[1:], output_layout(CAPACITY))["sampled_ids"]
        assert len(sampled) == 1 and 0 <= sampled[0] < TINY_LLAMA["vocab_size"]
        assert "not after the last step" in step_error(reply(master, one_token_step(6)))
        assert step_error(reply(master, one_token_step(7), REPLY_TIMEOUT_MS)) is None

        # a pending token is the sampled id of the step it follows: as if that id had been sent
        first = reply(master, one_token_step(8, token=-1, follows=7), REPLY_TIMEOUT_MS)
        assert step_error(first) is None
        step_7_token = int(unpack_arrays(answer[1:], output_layout(CAPACITY))["sampled_ids"][0])  # steps 6 and 7 alike
        same = reply(master, one_token_step(9, token=step_7_token), REPLY_TIMEOUT_MS)
        sampled_ids = [unpack_arrays(frames[1:], output_layout(CAPACITY))["sampled_ids"][0] for frames in (first, same)]
        assert sampled_ids[0] == sampled_ids[1]
        assert "follows step 8" in step_error(reply(master, one_token_step(10, token=-1, follows=8)))  # 9 ran after it
        assert "follows no other" in step_error(reply(master, one_token_step(11, token=-1)))
        assert step_error(reply(master, one_token_step(12), REPLY_TIMEOUT_MS)) is None
        assert "sampled row 2" in step_error(reply(master, one_token_step(13, token=-3, follows=12)))

        # a step whose mask follows runs its forward, then waits for the mask to sample
        assert reply(master, one_token_step(14, masks_follow=True), timeout_ms=1000) is None
        only_77 = np.zeros(CAPACITY.mask_width, np.int32)
        only_77[77 // 32] = 1 << (77 % 32)
        answer = reply(master, [encode(StepMasks(14, only_77.tobytes()))], REPLY_TIMEOUT_MS)
        assert step_error(answer) is None
        assert unpack_arrays(answer[1:], output_layout(CAPACITY))["sampled_ids"][0] == 77
        assert reply(master, [encode(StepMasks(14, only_77.tobytes()))], timeout_ms=300) is None  # stale: dropped
        assert reply(master, one_token_step(15, masks_follow=True), timeout_ms=300) is None
        assert "mask words" in step_error(reply(master, [encode(StepMasks(15, b"\x00" * 8))], REPLY_TIMEOUT_MS))
        assert reply(master, one_token_step(16, masks_follow=True), timeout_ms=300) is None
        assert "waited for its token masks" in step_error(reply(master, one_token_step(17), REPLY_TIMEOUT_MS))
        assert master.poll(REPLY_TIMEOUT_MS) and step_error(master.recv_multipart()) is None  # 17: answered next
        # the master may stop while a step waits for its masks
        assert reply(master, one_token_step(18, masks_follow=True), timeout_ms=300) is None
        assert process.poll() is None
        master.send(encode(Shutdown()))
        assert process.wait(30) == 0
    finally:
        context.destroy(linger=0)
