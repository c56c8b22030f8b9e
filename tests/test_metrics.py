"""``DaemonMetrics`` and ``QueueEventFeed``, on a ``Clock``: the queue's events in, the exposition
parsed back with ``prometheus_client``'s parser."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY
from twisted.internet.task import Clock

from netota_daemon.daemon.metrics import MAX_LABEL_CHARS, DaemonMetrics, QueueEventFeed
from tests.metrics_parse import Scrape


def make(clock: Clock | None = None) -> tuple[DaemonMetrics, QueueEventFeed, Clock]:
    clock = clock or Clock()
    metrics = DaemonMetrics({"dev1": "wlan1", "dev2": None}, "9.9.9", start_time=1700000000.0)
    return metrics, QueueEventFeed(metrics, clock), clock


def scrape(metrics: DaemonMetrics) -> Scrape:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain; version=")
    return Scrape(body.decode())


def ev(kind: str, job: str = "j1", device: str = "dev1", **fields: Any) -> dict[str, Any]:
    return {"type": kind, "job": job, "device": device, **fields}


def outcome(kind: str, failure: str | None = None, streams: list[dict[str, Any]] | None = None, **more: Any) -> Any:
    return {
        "kind": kind,
        "failure": failure,
        "phase": "done",
        "details": {"streams": streams or []},
        "firmware_version_before": more.get("before"),
        "firmware_version_after": more.get("after"),
    }


def test_fresh_metrics_have_version_start_time_and_one_info_series_per_device():
    metrics, _, _ = make()
    s = scrape(metrics)
    assert s.value("netota_build_info", version="9.9.9") == 1
    assert s.value("netota_start_time_seconds") == 1700000000.0
    info = sorted(s.series("netota_device_info"), key=lambda labels: labels["device"])
    assert [(i["device"], i["interface"], i["state"]) for i in info] == [
        ("dev1", "wlan1", "idle"),
        ("dev2", "", "idle"),
    ]
    assert s.value("netota_jobs_running") == 0 and s.value("netota_jobs_queued") == 0
    # Its own registry: nothing of it in the process-wide default one.
    assert REGISTRY.get_sample_value("netota_start_time_seconds") is None


def test_a_job_through_both_phases():
    metrics, feed, clock = make()
    feed(ev("state", state="queued", phase="detect", position=1))
    assert scrape(metrics).value("netota_jobs_queued") == 1
    clock.advance(3)
    feed(ev("state", state="running", phase="detect"))
    s = scrape(metrics)
    assert (s.value("netota_jobs_running"), s.value("netota_jobs_queued")) == (1, 0)
    assert s.series("netota_device_info")[0]["state"] == "running"
    feed(ev("phase", phase="phase1"))
    clock.advance(10)
    feed(ev("progress", phase="phase1", bytes_served=1000, percent=40.0, point_of_no_return=False))
    feed(ev("progress", phase="phase1", bytes_served=2500, percent=100.0, point_of_no_return=False))
    assert scrape(metrics).value("netota_served_bytes_total", device="dev1", phase="phase1") == 2500
    assert scrape(metrics).value("netota_device_progress_ratio", device="dev1") == 1.0
    feed(ev("phase", phase="reboot"))
    clock.advance(5)
    feed(ev("waiting", phase="reboot", attempt=1, last_error="connection refused"))
    feed(ev("waiting", phase="reboot", attempt=2, last_error="connection refused"))
    feed(ev("phase", phase="phase2"))
    feed(ev("progress", phase="phase2", bytes_served=700, percent=10.0, point_of_no_return=True))
    assert scrape(metrics).value("netota_device_point_of_no_return", device="dev1") == 1
    clock.advance(20)
    # The last progress event said 700; the stream's facts say the phase served 3100 in all.
    streams = [
        {"phase": "phase1", "end": "ok", "bytes_served": 2500, "bad_headers": 0},
        {"phase": "phase2", "end": "ok", "bytes_served": 3100, "bad_headers": 2},
    ]
    feed(ev("outcome", state="finished", outcome=outcome("succeeded", streams=streams, before="1.0", after="2.0")))

    s = scrape(metrics)
    assert s.value("netota_jobs_finished_total", device="dev1", outcome="succeeded", failure="none") == 1
    assert s.value("netota_served_bytes_total", device="dev1", phase="phase1") == 2500
    assert s.value("netota_served_bytes_total", device="dev1", phase="phase2") == 3100
    assert s.value("netota_connection_retries_total", device="dev1", phase="reboot") == 2
    assert s.value("netota_ota_corrupt_headers_skipped_total", device="dev1", phase="phase2") == 2
    assert s.value("netota_stops_sent_total") == 0
    assert s.value("netota_job_duration_seconds_count", outcome="succeeded") == 1
    assert s.value("netota_job_duration_seconds_sum", outcome="succeeded") == 35  # from running to the outcome
    assert s.value("netota_phase_duration_seconds_sum", phase="phase1") == 10
    assert s.value("netota_phase_duration_seconds_sum", phase="reboot") == 5
    assert s.value("netota_phase_duration_seconds_sum", phase="phase2") == 20
    (info,) = [i for i in s.series("netota_device_info") if i["device"] == "dev1"]
    assert info == {
        "device": "dev1",
        "interface": "wlan1",
        "state": "idle",
        "phase": "",
        "firmware_version": "2.0",
        "last_outcome": "succeeded",
    }
    assert (s.value("netota_jobs_running"), s.value("netota_jobs_queued")) == (0, 0)
    assert s.value("netota_device_point_of_no_return", device="dev1") == 0


def test_a_phase_2_restart_counts_both_streams():
    metrics, feed, _ = make()
    feed(ev("state", state="running", phase="phase2"))
    feed(ev("progress", phase="phase2", bytes_served=5000, percent=20.0))
    feed(ev("progress", phase="phase2", bytes_served=300, percent=20.0))  # the loader started again
    feed(ev("progress", phase="phase2", bytes_served=900, percent=30.0))
    assert scrape(metrics).value("netota_served_bytes_total", phase="phase2") == 5900


def test_cancel_timeout_and_failures_are_counted_by_class():
    metrics, feed, _ = make()
    feed(ev("state", state="running", phase="phase1"))
    feed(ev("state", state="cancelling", phase="phase1"))
    assert scrape(metrics).value("netota_jobs_running") == 1
    aborted = [{"phase": "phase1", "end": "aborted", "bytes_served": 10}]
    feed(ev("outcome", state="finished", outcome=outcome("aborted", streams=aborted)))
    feed(ev("state", job="j2", state="running", phase="phase1"))
    timed_out = [{"phase": "phase1", "end": "timeout", "bytes_served": 10, "stop_sent": True, "receive_timeouts": 11}]
    feed(ev("outcome", job="j2", state="finished", outcome=outcome("failed", "timeout", streams=timed_out)))
    feed(ev("state", job="j3", device="dev2", state="running", phase="detect"))
    feed(ev("outcome", job="j3", device="dev2", state="finished", outcome=outcome("failed", "connection")))
    feed(ev("state", job="j4", device="dev2", state="queued", phase="detect"))
    feed(ev("outcome", job="j4", device="dev2", state="interrupted", outcome=None))

    s = scrape(metrics)
    assert s.value("netota_jobs_finished_total", device="dev1", outcome="aborted", failure="none") == 1
    assert s.value("netota_jobs_finished_total", device="dev1", outcome="failed", failure="timeout") == 1
    assert s.value("netota_jobs_finished_total", device="dev2", outcome="failed", failure="connection") == 1
    assert s.value("netota_jobs_finished_total", device="dev2", outcome="interrupted") == 1
    assert s.value("netota_stops_sent_total", device="dev1", phase="phase1") == 2
    assert s.value("netota_ota_receive_timeouts_total", device="dev1", phase="phase1") == 11
    # A job that was never running has no duration.
    assert s.value("netota_job_duration_seconds_count", outcome="interrupted") == 0
    assert (s.value("netota_jobs_running"), s.value("netota_jobs_queued")) == (0, 0)


def test_labels_are_bounded_by_the_config_not_by_input():
    metrics, feed, _ = make()
    for i in range(50):
        feed(ev("state", job=f"x{i}", device=f"intruder{i}", state="running", phase="phase1"))
        feed(ev("progress", job=f"x{i}", device=f"intruder{i}", phase="phase1", bytes_served=10))
        feed(ev("progress", job=f"x{i}", device="dev1", phase=f"weird{i}", bytes_served=10))
    feed(ev("outcome", job="y", state="finished", outcome=outcome(f"kind{'z' * 100}", "no-such-class")))
    feed(ev("outcome", job="z", state="finished", outcome=outcome("succeeded", after="v" * 500 + "\n")))
    feed({"type": "progress"})  # no job, no device
    feed({"type": "unknown", "job": "a", "device": "dev1"})

    s = scrape(metrics)
    devices = {
        labels.get("device")
        for name in ("netota_served_bytes_total", "netota_jobs_finished_total")
        for labels in s.series(name)
    }
    assert devices <= {"dev1", "dev2"}
    assert {labels["phase"] for labels in s.series("netota_served_bytes_total")} <= {"phase1"}
    assert s.value("netota_jobs_finished_total", device="dev1", outcome="failed", failure="none") == 1
    assert s.value("netota_metrics_dropped_total") > 0
    (info,) = [i for i in s.series("netota_device_info") if i["device"] == "dev1"]
    assert len(info["firmware_version"]) == MAX_LABEL_CHARS and "\n" not in info["firmware_version"]
    assert len(s.series("netota_device_info")) == 2


def test_journal_latency_and_subscribers():
    metrics, _, _ = make()
    metrics.journal_write(0.002)
    metrics.journal_write(0.2)
    metrics.event_streams(3)
    s = scrape(metrics)
    assert s.value("netota_journal_write_seconds_count") == 2
    assert s.value("netota_journal_write_seconds_bucket", le="0.005") == 1
    assert s.value("netota_event_stream_subscribers") == 3


def test_every_metric_is_documented():
    from tests.conftest import ROOT

    metrics, feed, _ = make()
    feed(ev("state", state="running", phase="phase1"))
    feed(ev("outcome", state="finished", outcome=outcome("succeeded")))
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for name in scrape(metrics).families:
        assert f"`{name}" in doc, f"{name} is not in docs/metrics.md"
