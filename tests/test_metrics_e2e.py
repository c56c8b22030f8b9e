"""The metrics after real jobs: a real daemon, a simulator and a device that is not there; the
exposition scraped from ``/metrics`` (on the web endpoint and on the metrics endpoint of its own),
parsed with ``prometheus_client``'s parser, checked against what happened."""

from __future__ import annotations

import urllib.error

import pytest
import pytest_twisted

from tests.conftest import free_port
from tests.metrics_parse import Scrape


@pytest_twisted.ensureDeferred
async def test_metrics_count_what_happened(rig):
    rig.make_image("v2.bin", "2.0.0", 150_000)
    sim = await rig.start_sim("dev1")
    nobody = free_port()  # nothing listens there: every connection attempt is refused
    await rig.start_daemon(
        'metrics = "tcp:0:interface=127.0.0.1"',
        f'\n[devices.gone]\nhost = "127.0.0.1"\nctp_port = {nobody}\nhttp_port = {nobody}\nota_port = {nobody}\n',
    )
    metrics_port = await rig.listening_port("metrics")

    ok = rig.api("POST", "/v1/jobs", {"device": "dev1", "firmware": "v2.bin"})["job"]
    gone = rig.api("POST", "/v1/jobs", {"device": "gone", "firmware": "v2.bin"})["job"]
    await rig.wait_for(
        lambda: Scrape(rig.get_text("/metrics")).value("netota_connection_retries_total", device="gone") >= 1,
        "a retry of the device that is not there",
    )
    rig.api("POST", f"/v1/jobs/{gone['id']}/cancel", {"reason": "test"})
    await rig.wait_for(
        lambda: Scrape(rig.get_text("/metrics")).value("netota_jobs_finished_total") >= 2, "both jobs' ends"
    )
    assert rig.api("GET", f"/v1/jobs/{ok['id']}")["job"]["outcome"]["kind"] == "succeeded"

    s = Scrape(rig.get_text("/metrics", port=metrics_port))  # the endpoint of its own: the same numbers
    assert s.value("netota_jobs_finished_total", device="dev1", outcome="succeeded", failure="none") == 1
    assert s.value("netota_jobs_finished_total", device="gone", outcome="aborted") == 1
    assert s.value("netota_jobs_finished_total", outcome="failed") == 0
    assert s.value("netota_connection_retries_total", device="gone") >= 1
    # Bytes served, per phase, are what the simulator received.
    for phase in (1, 2):
        received = sum(e["bytes"] for e in sim.saw("session_end", phase=phase))
        assert received > 0
        assert s.value("netota_served_bytes_total", device="dev1", phase=f"phase{phase}") == received
    assert s.value("netota_job_duration_seconds_count", outcome="succeeded") == 1
    assert s.value("netota_phase_duration_seconds_count", phase="phase2") >= 1
    assert s.value("netota_jobs_running") == 0 and s.value("netota_jobs_queued") == 0
    assert s.value("netota_journal_write_seconds_count") >= 6  # created, running, phases, finished: two jobs
    (info,) = [i for i in s.series("netota_device_info") if i["device"] == "dev1"]
    assert info["firmware_version"] == "2.0.0" and info["last_outcome"] == "succeeded" and info["state"] == "idle"
    assert s.value("netota_build_info") == 1
    # The metrics endpoint serves only /metrics.
    with pytest.raises(urllib.error.HTTPError) as e:
        rig.get_text("/v1/status", port=metrics_port)
    assert e.value.code == 404
