"""The device's read model (sans-IO): windows, direction, percent, reply checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netota_daemon.sim.image import build_image
from netota_daemon.sim.transfer import (
    DeviceReader,
    ReadRequest,
    ReplyError,
    SizeNotice,
    TransferDone,
    TransferFailed,
)
from netota_daemon.wire.ota import MAX_READ_SIZE


def run(reader: DeviceReader, image: bytes) -> list:
    """Drive a reader against an ideal app; returns every step."""
    steps = []
    while True:
        step = reader.next_step()
        steps.append(step)
        if isinstance(step, ReadRequest):
            reader.deliver(step.seek, image[step.seek : step.seek + step.size])
        elif not isinstance(step, SizeNotice):
            return steps


def test_phase1_reads_forward_windows_starting_at_the_read():
    image = bytes(50_000)
    steps = run(DeviceReader(1, image_size=len(image)), image)
    assert steps == [
        ReadRequest(0, 20436, 1),
        ReadRequest(16896, 20436, 1),  # the 4096-byte read at 16896 crosses the first window's end
        ReadRequest(33280, 20436, 1),
        TransferDone(),
    ]


def test_phase2_small_reads_then_all_size_then_backward_windows():
    image = build_image("2.0.0", 150_000)
    reader = DeviceReader(2)
    steps = run(reader, image)
    assert steps[0] == ReadRequest(0, 40916, 1)
    assert steps[1] == SizeNotice(150_000, 1)
    backward = [s for s in steps[2:] if isinstance(s, ReadRequest)]
    assert backward[0] == ReadRequest(150_000 - 40916, 40916, 1)  # window ends at the file's end
    seeks = [s.seek for s in backward]
    assert seeks == sorted(seeks, reverse=True) and min(seeks) == 512
    percents = [s.percent for s in backward]
    assert percents == sorted(percents) and percents[-1] <= 99
    assert steps[-1] == TransferDone()
    assert reader.assembled() == image


def test_phase2_window_starts_at_the_read_near_the_start_of_the_file():
    reader = DeviceReader(2, image_size=100_000)
    image = bytes(100_000)
    steps = [s for s in run(reader, image) if isinstance(s, ReadRequest)]
    # reads at or below 40916-4096 = 36820 can't end a window there: the window starts at the
    # read, so each lower 4096-byte read misses the cache again
    assert [s.seek for s in steps[-3:]] == [5792, 1696, 512]  # reads end at 100000 - 4096k


def test_percent_follows_library_bytes_over_all_size_capped_at_99():
    reader = DeviceReader(2, image_size=1_000_000)
    image = bytes(1_000_000)
    steps = [s for s in run(reader, image) if isinstance(s, ReadRequest)]
    assert steps[0].percent == 1 and steps[1].percent == 1
    assert max(s.percent for s in steps) == 99
    # computed before counting the read: 40916 bytes read of 1e6 -> 4 % at the next miss, etc.
    assert steps[2].percent == (1_000_000 - steps[2].seek - 40916) * 100 // 1_000_000


def test_phase1_percent_stays_1_without_all_size():
    steps = [s for s in run(DeviceReader(1, image_size=300_000), bytes(300_000)) if isinstance(s, ReadRequest)]
    assert {s.percent for s in steps} == {1}


def test_phase1_can_send_all_size_when_asked():
    steps = run(DeviceReader(1, image_size=60_000, send_all_size=True), bytes(60_000))
    assert SizeNotice(60_000, 1) in steps


def test_unknown_length_fails_clearly():
    reader = DeviceReader(1)
    request = reader.next_step()
    reader.deliver(0, bytes(request.size))
    step = reader.next_step()
    assert isinstance(step, TransferFailed) and "--image-size" in step.reason


def test_a_file_shorter_than_one_window_is_its_own_length():
    image = bytes(range(256)) * 10
    reader = DeviceReader(1)
    assert run(reader, image)[-1] == TransferDone()
    assert reader.image_length == len(image) and reader.assembled() == image


@pytest.mark.parametrize(
    "seek, size, message",
    [(1, 20436, "asked for 0"), (0, 20437, "more than the 20436"), (0, 0, "short reply"), (0, 10, "short reply")],
)
def test_bad_replies_are_protocol_faults(seek, size, message):
    reader = DeviceReader(1, image_size=100_000)
    reader.next_step()
    with pytest.raises(ReplyError, match=message):
        reader.deliver(seek, bytes(size))


def test_short_reply_at_end_of_file_is_accepted():
    reader = DeviceReader(1, image_size=30_000)
    reader.deliver  # noqa: B018
    first = reader.next_step()
    reader.deliver(first.seek, bytes(first.size))
    second = reader.next_step()
    assert second.seek + second.size > 30_000
    reader.deliver(second.seek, bytes(30_000 - second.seek))
    assert reader.next_step() == TransferDone()


def test_deliver_without_request_and_next_step_while_waiting_are_errors():
    reader = DeviceReader(1, image_size=30_000)
    with pytest.raises(ReplyError):
        reader.deliver(0, b"x")
    reader.next_step()
    with pytest.raises(RuntimeError):
        reader.next_step()


@settings(max_examples=40, deadline=None)
@given(phase=st.sampled_from([1, 2]), size=st.integers(min_value=88, max_value=400_000))
def test_any_image_is_received_whole_within_42k_requests(phase, size):
    image = build_image("3.1.4", size)
    reader = DeviceReader(phase)
    steps = run(reader, image)
    assert steps[-1] == TransferDone()
    assert reader.assembled() == image
    requests = [s for s in steps if isinstance(s, ReadRequest)]
    assert all(0 < s.size <= MAX_READ_SIZE for s in requests)
    assert [s.seek for s in requests].count(0) == 1 and requests[0].seek == 0
    assert sum(isinstance(s, SizeNotice) for s in steps) == (1 if phase == 2 else 0)


@pytest.mark.parametrize("phase", [1, 2])
def test_a_double_backup_image_fails_the_ufw_check_after_the_head(phase):
    image = build_image("2.0.0", 100_000, "double")
    reader = DeviceReader(phase)
    steps = run(reader, image)
    assert len(steps) == 2 and isinstance(steps[1], TransferFailed)
    assert "double-backup image" in steps[1].reason
