"""Prometheus metrics of one server, all named `llmserve_*`, in a registry of its own.

Queue lengths, KV-cache usage and preemptions are read from the engine when
`/metrics` is scraped, so they cost the step loop nothing; counters and
histograms are updated where the event happens (a cached child per label, well
under a microsecond per observation).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "llmserve"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FINISH_REASONS = ("length", "eos_token", "stop_sequence", "abort", "error")

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
STAGE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineState(Collector):
    """Gauges and counters the engine already keeps, read at scrape time."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self) -> Iterator:
        stats = self.stats()
        yield _gauge("requests_running", "Requests with sequences in the running batch.", stats["num_running"])
        yield _gauge("requests_waiting", "Requests queued for their first (or a recomputed) prefill.", stats["num_waiting"])
        total, free = stats["kv_blocks_total"], stats["kv_blocks_free"]
        yield _gauge("kv_cache_blocks_total", "KV-cache blocks in the pool.", total)
        yield _gauge("kv_cache_blocks_free", "KV-cache blocks not held by any sequence.", free)
        yield _gauge("kv_cache_tokens", "Tokens the KV cache holds (blocks x block size).", stats["kv_cache_tokens"])
        yield _gauge("kv_cache_usage_ratio", "Share of the KV-cache blocks in use (0 to 1).", (total - free) / total)
        yield CounterMetricFamily(
            f"{PREFIX}_requests_preempted", "Sequences preempted (blocks freed, recomputed later).", stats["num_preemptions"]
        )
        yield CounterMetricFamily(f"{PREFIX}_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  stats["prefix_cache_queries"])
        yield CounterMetricFamily(f"{PREFIX}_prefix_cache_hits", "Prompt tokens whose KV blocks the prefix cache held.",
                                  stats["prefix_cache_hits"])
        if "spec_drafts" in stats:
            yield from _spec_decode_metrics(stats)
        yield CounterMetricFamily(f"{PREFIX}_agent_restarts", "Times dead agents were replaced and served again.", stats["agent_restarts"])
        memory = GaugeMetricFamily(f"{PREFIX}_process_resident_memory_bytes", "Resident memory of the master and its "
                                   "agents on this host.", labels=["process"])
        cpu = CounterMetricFamily(f"{PREFIX}_process_cpu_seconds", "User + system CPU time of the master and its "
                                  "agents on this host.", labels=["process"])
        for process in stats["processes"]:
            memory.add_metric([process["process"]], process["rss_bytes"])
            cpu.add_metric([process["process"]], process["cpu_seconds"])
        yield memory
        yield cpu


def _spec_decode_metrics(stats: dict) -> Iterator:
    """Speculative decoding's counters (vLLM's names): verifications, proposed and accepted tokens, and per
    position how many drafts had their token there accepted."""
    yield CounterMetricFamily(f"{PREFIX}_spec_decode_num_drafts", "Decode steps of a sequence that verified "
                              "proposed tokens.", stats["spec_drafts"])
    yield CounterMetricFamily(f"{PREFIX}_spec_decode_num_draft_tokens", "Proposed tokens verified.",
                              stats["spec_draft_tokens"])
    yield CounterMetricFamily(f"{PREFIX}_spec_decode_num_accepted_tokens", "Proposed tokens accepted.",
                              stats["spec_accepted_tokens"])
    per_position = CounterMetricFamily(f"{PREFIX}_spec_decode_num_accepted_tokens_per_pos", "Drafts whose token at "
                                       "this position (0 the first) was accepted.", labels=["position"])
    for position, count in enumerate(stats["spec_accepted_per_position"]):
        per_position.add_metric([str(position)], count)
    yield per_position


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


class Metrics:
    """The server's metrics; the engine calls the `on_*` methods, `/metrics` calls `render`."""

    def __init__(self, stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineState(stats))
        self.requests = self._counter("requests", "Finished requests by finish reason.", ["finish_reason"])
        self.by_reason = {reason: self.requests.labels(reason) for reason in FINISH_REASONS}
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens prefilled (counted when a request's first token is out).")
        self.generation_tokens = self._counter("generation_tokens", "Tokens generated, over all sequences.")
        self.ttft = self._histogram("time_to_first_token_seconds", "From arrival to the first generated token.", REQUEST_BUCKETS)
        self.tpot = self._histogram(
            "time_per_output_token_seconds", "Per request: (end - first token) / (output tokens - 1).", TOKEN_BUCKETS
        )
        self.e2e = self._histogram("e2e_request_latency_seconds", "From arrival to the last token.", REQUEST_BUCKETS)
        self.queue = self._histogram("request_queue_time_seconds", "From arrival to the first scheduled step.", REQUEST_BUCKETS)
        self.step = self._histogram("step_duration_seconds", "Wall time of one engine step, schedule to detokenize.", STAGE_BUCKETS)
        self.stages = self._histogram(
            "stage_seconds", "Per-step stage timers (schedule, build, IPC, preprocess, predict, sample, ...).",
            STAGE_BUCKETS, ["component", "stage"],
        )
        self.stage_children: dict[tuple[str, str], Histogram] = {}
        self.num_prompt_tokens = self.num_generation_tokens = 0  # for the periodic log line

    def _counter(self, name: str, documentation: str, labels: tuple = ()) -> Counter:
        return Counter(f"{PREFIX}_{name}", documentation, labels, registry=self.registry)

    def _histogram(self, name: str, documentation: str, buckets: tuple, labels: tuple = ()) -> Histogram:
        return Histogram(f"{PREFIX}_{name}", documentation, labels, registry=self.registry, buckets=buckets)

    def on_first_token(self, num_prompt_tokens: int, ttft_s: float, queue_s: float) -> None:
        self.num_prompt_tokens += num_prompt_tokens
        self.prompt_tokens.inc(num_prompt_tokens)
        self.ttft.observe(ttft_s)
        self.queue.observe(queue_s)

    def on_finish(self, reason: str, e2e_s: float, tpot_s: float | None) -> None:
        self.by_reason[reason].inc()
        self.e2e.observe(e2e_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)

    def on_step(self, step_s: float, num_new_tokens: int, master_ms: dict, agent_ms: dict) -> None:
        self.num_generation_tokens += num_new_tokens
        self.step.observe(step_s)
        self.generation_tokens.inc(num_new_tokens)
        self._observe_stages("master", master_ms)
        self._observe_stages("agent", agent_ms)

    def _observe_stages(self, component: str, timings_ms: dict) -> None:
        for stage, ms in timings_ms.items():
            child = self.stage_children.get((component, stage))
            if child is None:
                child = self.stage_children[(component, stage)] = self.stages.labels(component, stage)
            child.observe(ms * 1e-3)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


TOTALS = ("prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
          "spec_drafts", "spec_draft_tokens", "spec_accepted_tokens")


class StatsLine:
    """The periodic log line: throughput, queues, KV-cache use and the prefix-cache hit rate over the last
    interval; rates are per busy second (time the step loop sat idle is left out)."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.last_time: Optional[float] = None
        self.last: dict[str, int] = {}
        self.idle_since: Optional[float] = None
        self.idle_s = 0.0

    def idle(self, now: float) -> None:
        """The step loop has nothing to run."""
        if self.idle_since is None:
            self.idle_since = now

    def busy(self, now: float) -> None:
        """The step loop ran a step."""
        if self.idle_since is not None:
            self.idle_s += now - self.idle_since
            self.idle_since = None

    def due(self, now: float) -> bool:
        return self.interval_s > 0 and (self.last_time is None or now - self.last_time >= self.interval_s)

    def line(self, now: float, stats: dict) -> Optional[str]:
        """The line for the interval ending now (None for the first call, which starts the window)."""
        totals = {name: stats.get(name, 0) for name in TOTALS}
        last, last_time, idle_s = self.last, self.last_time, self.idle_s
        self.last, self.last_time, self.idle_s = totals, now, 0.0
        if last_time is None:
            return None
        delta = {name: totals[name] - last[name] for name in TOTALS}
        busy_s = max(now - last_time - idle_s, 1e-9)
        used = 1 - stats["kv_blocks_free"] / max(stats["kv_blocks_total"], 1)
        queried = delta["prefix_cache_queries"]
        hit_rate = f"{delta['prefix_cache_hits'] / queried:.1%}" if queried else "n/a"
        return (f"prompt {delta['prompt_tokens'] / busy_s:.1f} tok/s, generation {delta['generation_tokens'] / busy_s:.1f} "
                f"tok/s; running {stats['num_running']}, waiting {stats['num_waiting']} requests; "
                f"{delta['num_preemptions']} preemptions; KV cache {used:.1%} used; prefix cache hit rate {hit_rate} "
                f"of {queried} prompt tokens{_speculation(stats, delta)} (last {now - last_time:.0f} s, {busy_s:.0f} s busy)")


def _speculation(stats: dict, delta: dict) -> str:
    """The interval's acceptance rate and mean acceptance length (tokens per verifying step), with speculation on."""
    if "spec_drafts" not in stats:
        return ""
    drafts, proposed, accepted = delta["spec_drafts"], delta["spec_draft_tokens"], delta["spec_accepted_tokens"]
    if not drafts:
        return "; speculation: nothing verified"
    return (f"; speculation: {accepted / proposed:.1%} of {proposed} proposed tokens accepted, "
            f"mean acceptance length {1 + accepted / drafts:.2f}")
