"""/metrics moves as a known set of requests says it should."""
from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from llmserve.master.tokenizer import decode, encode
from tests.unit.fake_agent import TOKENIZER, fake_config, fake_engine
from tests.unit.test_api import call, wait_until


def samples(text: str) -> dict:
    """{(sample name, frozenset of labels): value} of a Prometheus text page."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(page: dict, name: str, **labels) -> float:
    return page[(name, frozenset(labels.items()))]


def test_counters_and_histograms_after_known_requests():
    prompt_ids = encode(TOKENIZER, "Hello there")
    stop = decode(TOKENIZER, [prompt_ids[-1] + 2]).strip()

    async def go(client, engine):
        before = samples((await client.get("/metrics")).text)
        for _ in range(2):
            await client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 3, "temperature": 0})
        await client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 6, "temperature": 0, "stop": stop})
        await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 9999})  # refused: counts nowhere
        return before, samples((await client.get("/metrics")).text), engine

    before, after, engine = call(go)
    assert value(before, "llmserve_requests_total", finish_reason="length") == 0
    assert value(after, "llmserve_requests_total", finish_reason="length") == 2
    assert value(after, "llmserve_requests_total", finish_reason="stop_sequence") == 1
    assert value(after, "llmserve_requests_total", finish_reason="error") == 0
    assert value(after, "llmserve_prompt_tokens_total") == 3 * len(prompt_ids)
    assert value(after, "llmserve_generation_tokens_total") == 3 + 3 + 2
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time", "time_per_output_token"):
        assert value(after, f"llmserve_{histogram}_seconds_count") == 3, histogram
    num_steps = value(after, "llmserve_step_duration_seconds_count")
    assert num_steps >= 3 + 2  # the first request alone takes 3 steps
    for component, stage in (("master", "schedule"), ("master", "detokenize"), ("agent", "predict")):
        assert value(after, "llmserve_stage_seconds_count", component=component, stage=stage) == num_steps
    assert value(after, "llmserve_requests_running") == 0 and value(after, "llmserve_requests_waiting") == 0
    assert value(after, "llmserve_kv_cache_usage_ratio") == 0.0
    assert value(after, "llmserve_kv_cache_blocks_total") == engine.block_manager.num_blocks


def test_gauges_show_a_request_in_flight_and_its_kv_blocks():
    slow = fake_engine(fake_config(decode_batch_waiting_time=0.05, decode_batch_size=8))

    async def go(client, engine):
        body = {"prompt": "a long story", "max_tokens": 40, "ignore_eos": True, "n": 2, "temperature": 1.0}
        request = asyncio.ensure_future(client.post("/v1/completions", json=body))
        assert await wait_until(lambda: engine.handles and next(iter(engine.handles.values())).seq.num_output_tokens >= 2, 5)
        during = samples((await client.get("/metrics")).text)
        await request
        return during

    during = call(go, slow)
    assert value(during, "llmserve_requests_running") == 1  # two samples, one request
    assert 0 < value(during, "llmserve_kv_cache_usage_ratio") < 1


def test_the_periodic_stats_line_reports_the_busy_throughput_and_prefix_cache_hit_rate_of_its_interval():
    from llmserve.master.metrics import StatsLine

    stats = {"num_running": 2, "num_waiting": 1, "kv_blocks_free": 75, "kv_blocks_total": 100, "num_preemptions": 1,
             "prompt_tokens": 100, "generation_tokens": 50, "prefix_cache_queries": 100, "prefix_cache_hits": 20}
    line = StatsLine(interval_s=10.0)
    assert line.due(0.0) and line.line(0.0, stats) is None  # the first call opens the window
    assert not line.due(5.0) and line.due(10.0)
    later = {**stats, "prompt_tokens": 300, "generation_tokens": 150, "prefix_cache_queries": 300,
             "prefix_cache_hits": 170, "num_preemptions": 3}
    line.idle(2.0)  # 4 s with nothing to run: left out of the rates
    line.busy(6.0)
    text = line.line(10.0, later)
    assert "prompt 33.3 tok/s, generation 16.7 tok/s" in text and "running 2, waiting 1" in text
    assert "(last 10 s, 6 s busy)" in text
    assert "2 preemptions" in text and "KV cache 25.0% used" in text and "prefix cache hit rate 75.0% of 200" in text
    assert not StatsLine(interval_s=0).due(100.0)
