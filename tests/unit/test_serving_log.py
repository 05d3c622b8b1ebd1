"""Load-test records: summary statistics with known answers, goodput under SLOs, JSONL round trip."""
from __future__ import annotations

import pytest

from llmserve.tools.serving_log import RequestRecord, format_summary, read_records, summarize, write_records

DURATION_S = 2.0
RECORDS = [
    RequestRecord("a", 1000.0, prompt_tokens=10, output_tokens=5, first_token_time=0.1, res_time=0.5,
                  itl=[0.1, 0.1, 0.1, 0.1]),
    RequestRecord("b", 1000.5, prompt_tokens=20, output_tokens=3, first_token_time=0.3, res_time=0.7, itl=[0.2, 0.2]),
    RequestRecord("c", 1001.0, prompt_tokens=10, output_tokens=1, first_token_time=0.2, res_time=0.2, itl=[]),
    RequestRecord("d", 1001.2, prompt_tokens=10, output_tokens=0, first_token_time=None, res_time=0.01,
                  error="HTTP 500: boom"),
]


def test_failed_requests_are_counted_not_dropped():
    summary = summarize(RECORDS, DURATION_S)
    assert summary["num_completed"] == 3 and summary["num_failed"] == 1
    assert summary["errors"] == {"HTTP 500: boom": 1}


def test_throughputs_count_completed_requests_only():
    summary = summarize(RECORDS, DURATION_S)
    assert summary["request_throughput"] == pytest.approx(1.5)
    assert summary["output_throughput"] == pytest.approx(9 / 2.0)
    assert summary["total_throughput"] == pytest.approx((40 + 9) / 2.0)


def test_latency_distributions_use_linear_interpolation():
    summary = summarize(RECORDS, DURATION_S)
    assert summary["ttft_s"] == pytest.approx({"mean": 0.2, "median": 0.2, "p90": 0.28, "p99": 0.298})
    assert summary["e2e_s"]["mean"] == pytest.approx(1.4 / 3) and summary["e2e_s"]["median"] == pytest.approx(0.5)
    assert summary["itl_s"]["mean"] == pytest.approx(0.8 / 6) and summary["itl_s"]["median"] == pytest.approx(0.1)


def test_tpot_excludes_the_first_token_and_single_token_requests():
    assert RECORDS[0].tpot == pytest.approx(0.1) and RECORDS[1].tpot == pytest.approx(0.2)
    assert RECORDS[2].tpot is None
    assert summarize(RECORDS, DURATION_S)["tpot_s"] == pytest.approx(
        {"mean": 0.15, "median": 0.15, "p90": 0.19, "p99": 0.199})


@pytest.mark.parametrize("slo_ttft_s, slo_tpot_s, goodput", [
    (None, None, 1.5),     # every completed request
    (0.15, None, 0.5),     # only a
    (None, 0.15, 1.0),     # a, and c (one token, no TPOT to miss)
    (0.35, 0.15, 1.0),     # b misses TPOT
    (0.15, 0.15, 0.5),
])
def test_goodput_counts_completed_requests_meeting_every_slo(slo_ttft_s, slo_tpot_s, goodput):
    assert summarize(RECORDS, DURATION_S, slo_ttft_s, slo_tpot_s)["goodput"] == pytest.approx(goodput)


def test_summary_of_only_failures_has_no_latencies():
    summary = summarize(RECORDS[3:], DURATION_S)
    assert summary["num_completed"] == 0 and summary["ttft_s"]["p99"] is None
    assert "failed requests" in format_summary(summary)


def test_table_shows_counts_slos_and_errors():
    table = format_summary(summarize(RECORDS, DURATION_S, slo_ttft_s=0.15))
    assert "TTFT <= 150 ms" in table
    assert "failed x1: HTTP 500: boom" in table
    ttft_row = next(line for line in table.splitlines() if line.startswith("TTFT "))
    assert ttft_row.split()[1:] == ["200.00", "200.00", "280.00", "298.00"]


def test_records_survive_a_jsonl_round_trip(tmp_path):
    path = str(tmp_path / "requests.jsonl")
    write_records(path, RECORDS)
    assert read_records(path) == RECORDS


def test_token_times_rebuild_each_arrival_from_send_time_and_gaps():
    assert RECORDS[0].token_times() == pytest.approx([1000.1, 1000.2, 1000.3, 1000.4, 1000.5])
    assert RECORDS[3].token_times() == []
