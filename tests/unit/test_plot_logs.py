"""Plots of two runs' logs: every PNG is written, and throughput is rebuilt from token arrivals."""
from __future__ import annotations

import pytest

from llmserve.tools.plot_logs import main, throughput_over_time
from llmserve.tools.serving_log import RequestRecord, write_records


def synthetic_run(gap_s: float, num_requests: int = 6) -> list[RequestRecord]:
    records = [RequestRecord(f"r{i}", 1000.0 + 0.5 * i, prompt_tokens=8, output_tokens=5,
                             first_token_time=0.1 + 0.01 * i, res_time=0.1 + 0.01 * i + 4 * gap_s, itl=[gap_s] * 4)
               for i in range(num_requests)]
    records.append(RequestRecord("failed", 1000.2, error="HTTP 503: queue full"))
    return records


def test_throughput_bins_count_each_token_arrival():
    record = RequestRecord("a", 100.0, output_tokens=4, first_token_time=0.5, res_time=2.0, itl=[0.25, 0.5, 0.7])
    starts, rates = throughput_over_time([record], bin_s=1.0)
    assert list(starts) == [0.0, 1.0] and list(rates) == [2.0, 2.0]  # tokens at 0.5, 0.75 | 1.25, 1.95


def test_two_runs_give_every_plot(tmp_path):
    for name, gap_s in (("base", 0.2), ("tuned", 0.05)):
        (tmp_path / name).mkdir()
        write_records(str(tmp_path / name / "requests.jsonl"), synthetic_run(gap_s))
    outdir = tmp_path / "plots"
    logs = [str(tmp_path / "base" / "requests.jsonl"), str(tmp_path / "tuned" / "requests.jsonl")]
    assert main(logs + ["--labels", "base", "tuned", "-O", str(outdir)]) == 0
    names = ["res_time.png", "first_token_time.png", "res_time_cdf.png", "first_token_time_cdf.png", "throughput.png"]
    for name in names:
        assert (outdir / name).stat().st_size > 1000, name


def test_labels_must_match_the_logs(tmp_path):
    path = str(tmp_path / "requests.jsonl")
    write_records(path, synthetic_run(0.1))
    with pytest.raises(SystemExit):
        main([path, path, "--labels", "only-one", "-O", str(tmp_path)])


def test_a_run_with_no_completed_request_still_plots(tmp_path):
    path = str(tmp_path / "requests.jsonl")
    write_records(path, [RequestRecord("failed", 1000.0, error="ConnectError")])
    assert main([path, "-O", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "throughput.png").stat().st_size > 0


def test_the_plot_verb_writes_the_plots(tmp_path, capsys):
    from llmserve.cli import main as llmserve

    path = str(tmp_path / "run1" / "requests.jsonl")
    (tmp_path / "run1").mkdir()
    write_records(path, synthetic_run(0.1))
    assert llmserve(["plot", path, "-O", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "res_time_cdf.png").stat().st_size > 1000
    assert str(tmp_path / "plots" / "throughput.png") in capsys.readouterr().out
