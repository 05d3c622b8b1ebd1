"""Compare load-test runs (`requests.jsonl` of tools/bench_serving.py) as PNG plots.

Writes, for the completed requests of every run: res_time and first_token_time
per request, their CDFs, and output tokens/s over time:

    llmserve plot run1/requests.jsonl run2/requests.jsonl --labels base tuned -O plots/

(`python tools/plot_logs.py ...` in the repository takes the same arguments.)
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmserve.tools.serving_log import RequestRecord, read_records  # noqa: E402

FIELDS = {"res_time": "end-to-end latency", "first_token_time": "time to first token"}


def completed_in_send_order(records: list[RequestRecord]) -> list[RequestRecord]:
    return sorted((r for r in records if r.is_ok), key=lambda r: r.send_time)


def cdf(values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values and the fraction of values at or below each."""
    xs = np.sort(np.asarray(values, dtype=float))
    return xs, np.arange(1, len(xs) + 1) / max(len(xs), 1)


def throughput_over_time(records: list[RequestRecord], bin_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Start of each `bin_s` bin (seconds since the run's first send) and the output tokens/s in it."""
    if not records:
        return np.zeros(0), np.zeros(0)
    start = min(r.send_time for r in records)
    times = np.asarray([t - start for r in records if r.is_ok for t in r.token_times()])
    if times.size == 0:
        return np.zeros(0), np.zeros(0)
    num_bins = int(times.max() // bin_s) + 1
    counts = np.bincount((times // bin_s).astype(int), minlength=num_bins)
    return np.arange(num_bins) * bin_s, counts / bin_s


def save_figure(figure, outdir: str, name: str) -> str:
    path = os.path.join(outdir, name)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_per_request(runs: dict[str, list[RequestRecord]], field: str, outdir: str) -> str:
    """`field` of each completed request, by send order."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for label, records in runs.items():
        values = [getattr(r, field) for r in completed_in_send_order(records)]
        axes.plot(range(len(values)), values, marker=".", linewidth=0.8, label=label)
    axes.set(title=f"{FIELDS[field]} per request", xlabel="request (in send order)", ylabel=f"{field} (s)")
    axes.legend()
    return save_figure(figure, outdir, f"{field}.png")


def plot_cdf(runs: dict[str, list[RequestRecord]], field: str, outdir: str) -> str:
    """Cumulative distribution of `field` over the completed requests."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for label, records in runs.items():
        xs, ys = cdf([getattr(r, field) for r in records if r.is_ok])
        axes.step(xs, ys, where="post", label=label)
    axes.set(title=f"CDF of {FIELDS[field]}", xlabel=f"{field} (s)", ylabel="fraction of requests", ylim=(0, 1.02))
    axes.legend()
    return save_figure(figure, outdir, f"{field}_cdf.png")


def plot_throughput(runs: dict[str, list[RequestRecord]], outdir: str, bin_s: float) -> str:
    """Output tokens/s over time, from each token's arrival."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for label, records in runs.items():
        starts, rates = throughput_over_time(records, bin_s)
        axes.stairs(rates, np.append(starts, starts[-1] + bin_s) if starts.size else [0.0], label=label)
    axes.set(title=f"output throughput ({bin_s:g} s bins)", xlabel="time since first request (s)",
             ylabel="output tokens/s")
    axes.legend()
    return save_figure(figure, outdir, "throughput.png")


def plot_runs(runs: dict[str, list[RequestRecord]], outdir: str, bin_s: float = 1.0) -> list[str]:
    """Every plot of the runs; the paths written."""
    os.makedirs(outdir, exist_ok=True)
    paths = [plot_per_request(runs, field, outdir) for field in FIELDS]
    paths += [plot_cdf(runs, field, outdir) for field in FIELDS]
    return paths + [plot_throughput(runs, outdir, bin_s)]


def default_label(path: str) -> str:
    """The run's directory name (run1/requests.jsonl -> run1), else the file name."""
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return parent if os.path.basename(path) == "requests.jsonl" and parent else os.path.basename(path)


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    """`llmserve plot`: write the plots of the runs and print their paths."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="requests.jsonl of each run")
    parser.add_argument("--labels", nargs="+", help="one legend label per log (default: the run's directory)")
    parser.add_argument("-O", "--outdir", default="plots")
    parser.add_argument("--bin", type=float, default=1.0, help="seconds per throughput bin")
    args = parser.parse_args(argv)
    labels = args.labels or [default_label(path) for path in args.logs]
    if len(labels) != len(args.logs) or len(set(labels)) != len(labels):
        parser.error("give one distinct label per log")
    runs = {label: read_records(path) for label, path in zip(labels, args.logs)}
    for path in plot_runs(runs, args.outdir, args.bin):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
