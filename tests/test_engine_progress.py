"""``ProgressMeter``: honest progress from a stream's facts (what a person reads in every bar)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netota_daemon.engine.events import TransferState
from netota_daemon.engine.outcome import Phase
from netota_daemon.engine.progress import MAX_PERCENT_BEFORE_OK, MIN_RATE_SPAN, ProgressMeter
from netota_daemon.protocols.ota_stream import DeviceActivity, StreamProgress

SIZE = 300_000


def facts(**changes) -> StreamProgress:
    values = dict(
        bytes_served=0,
        image_size=SIZE,
        furthest=0,
        all_size=0,
        requested_since_all_size=0,
        device_percent=1,
        rate=0.0,
        rate_span=0.0,
        activity=None,
    )
    values.update(changes)
    return StreamProgress(**values)


def test_phase_1_counts_the_furthest_byte_asked_for_against_the_image():
    meter = ProgressMeter(Phase.PHASE1)
    p = meter.from_stream(facts(bytes_served=100_000, furthest=150_000, rate=50_000, rate_span=2.0), False)
    assert (p.basis, p.done_bytes, p.total_bytes, p.percent) == ("offset", 150_000, SIZE, 50.0)
    assert p.state is TransferState.TRANSFERRING and p.eta == pytest.approx(3.0)


def test_phase_2_is_0_percent_while_the_loader_reads_the_header_then_counts_against_all_size():
    meter = ProgressMeter(Phase.PHASE2)
    header = meter.from_stream(facts(bytes_served=81_832, furthest=81_832), False)
    assert (header.basis, header.percent, header.eta) == ("header", 0.0, None)
    assert header.activity == "the loader reads the image's header"
    notice = meter.from_stream(facts(bytes_served=81_832, all_size=SIZE, activity=DeviceActivity.PREPARING), True)
    assert notice.state is TransferState.DEVICE_WORKING and "erasing flash" in notice.activity
    assert notice.eta is None and notice.point_of_no_return
    later = meter.from_stream(facts(bytes_served=81_832 + 30_000, all_size=SIZE, requested_since_all_size=30_000), True)
    assert (later.basis, later.done_bytes, later.total_bytes, later.percent) == ("all_size", 30_000, SIZE, 10.0)
    assert later.bytes_served == 111_832  # what was really sent, re-reads included


def test_percent_stops_below_100_until_the_device_says_ok():
    meter = ProgressMeter(Phase.PHASE1)
    last_reply = meter.from_stream(facts(bytes_served=SIZE, furthest=SIZE), False)
    assert last_reply.percent == MAX_PERCENT_BEFORE_OK
    finishing = meter.from_stream(facts(bytes_served=SIZE, furthest=SIZE, activity=DeviceActivity.FINISHING), False)
    assert finishing.state is TransferState.DEVICE_WORKING and finishing.percent == MAX_PERCENT_BEFORE_OK
    assert finishing.eta is None
    ok = meter.from_stream(facts(bytes_served=SIZE, furthest=SIZE, ok=True), False)
    assert (ok.state, ok.percent, ok.basis) == (TransferState.DONE, 100.0, "done")


def test_no_eta_from_a_rate_measured_too_briefly():
    meter = ProgressMeter(Phase.PHASE1)
    p = meter.from_stream(facts(bytes_served=20_000, furthest=20_000, rate=1e6, rate_span=MIN_RATE_SPAN / 2), False)
    assert p.eta is None


def test_a_new_attempt_starts_again_from_zero():
    meter = ProgressMeter(Phase.PHASE2)
    assert meter.from_stream(facts(all_size=SIZE, requested_since_all_size=SIZE // 2), True).percent == 50.0
    meter.new_attempt()
    assert meter.from_stream(facts(), True).percent == 0.0


@given(
    st.lists(
        st.tuples(st.integers(0, SIZE), st.integers(0, SIZE), st.booleans(), st.sampled_from([None, *DeviceActivity])),
        min_size=1,
        max_size=40,
    )
)
def test_percent_never_goes_backwards_whatever_the_device_reports(steps):
    meter = ProgressMeter(Phase.PHASE2)
    last = 0.0
    all_size = 0
    for furthest, since, notice, activity in steps:
        all_size = all_size or (SIZE if notice else 0)
        p = meter.from_stream(
            facts(furthest=furthest, all_size=all_size, requested_since_all_size=since, activity=activity),
            bool(all_size),
        )
        assert p.percent >= last and p.percent <= MAX_PERCENT_BEFORE_OK
        assert p.done_bytes <= p.total_bytes
        last = p.percent
