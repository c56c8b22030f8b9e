"""The double-backup route's decisions (FTP upload, reboot, verify) against the scripted fake device,
on a Clock, with sockets and processes disabled; and the image-kind checks both routes make first."""

from __future__ import annotations

import itertools

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from netota_daemon.engine.events import PhaseChanged, Progress, TransferState
from netota_daemon.engine.job import UpgradeJob
from netota_daemon.engine.outcome import (
    ADVICE_NOT_ACCEPTED,
    ADVICE_UPLOAD_INCOMPLETE,
    ADVICE_UPLOAD_UNSETTLED,
    FailureClass,
    OutcomeKind,
    Phase,
)
from netota_daemon.engine.settings import DeviceTarget, UpgradeTimeouts
from netota_daemon.firmware import FirmwareImage
from netota_daemon.protocols.ftp_upload import UploadEnd
from tests.engine_fakes import IMAGE_SIZE, FakeDevice, FakeLink, Mode, StreamPlan, UploadPlan, run_to_end, run_until
from tests.images import image_bytes_of

pytestmark = pytest.mark.usefixtures("no_sockets_or_processes")

TARGET = DeviceTarget(name="cam-1", host="192.0.2.1", ftp_port=2121, ftp_user="admin", ftp_password="pw")


class World:
    def __init__(self, tmp_path, image_bytes: bytes, ota_type: str | None = "0") -> None:
        self.clock = Clock()
        self.device = FakeDevice(self.clock, ota_type=ota_type)
        self.link = FakeLink(self.device)
        path = tmp_path / "update-ota.ufw"
        path.write_bytes(image_bytes)
        self.image = FirmwareImage(path)
        self.events: list = []

    def run(self, target: DeviceTarget = TARGET, **timeouts):
        self.job = UpgradeJob(self.clock, target, self.image, UpgradeTimeouts(**timeouts), "job-1", link=self.link)
        self.job.events.subscribe(self.events.append)
        outcome = run_to_end(self.clock, self.job)
        assert set(self.clock.getDelayedCalls()) <= self.device.timers
        return outcome

    def phases(self) -> list[Phase]:
        return [e.phase for e in self.events if isinstance(e, PhaseChanged)]

    def uploads(self) -> int:
        return self.link.names().count("upload")


@pytest.fixture
def world(tmp_path):
    return World(tmp_path, image_bytes_of("double"))


def test_a_double_backup_device_is_upgraded_by_one_upload_then_its_reboot(world):
    outcome = world.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert (outcome.firmware_version_before, outcome.firmware_version_after) == ("1.0.0", "2.0.0")
    assert world.phases() == [Phase.DETECT, Phase.UPLOAD, Phase.REBOOT, Phase.VERIFY, Phase.DONE]
    assert not outcome.point_of_no_return and outcome.advice == ""
    (settings,) = world.link.upload_settings
    assert (settings.user, settings.password, settings.remote_name) == ("admin", "pw", "update-ota.ufw")
    assert world.link.ota_phases == [] and "connect_ctp" not in world.link.names()  # no 3335, no CTP
    assert outcome.details["route"] == "double_backup" and outcome.details["upload_attempts"] == 1
    upload = [e for e in world.events if isinstance(e, Progress) and e.phase is Phase.UPLOAD]
    assert [p.percent for p in upload] == sorted(p.percent for p in upload)
    assert any(p.state is TransferState.DEVICE_WORKING for p in upload)
    assert upload[-1].state is TransferState.DONE and upload[-1].percent == 100.0
    assert all(p.percent < 100 for p in upload[:-1])


def test_an_unchanged_version_after_the_reboot_is_said_plainly(world):
    world.device.fixed_version = True
    outcome = world.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED
    assert "still reports firmware 1.0.0" in outcome.message and "can't confirm" in outcome.message


@pytest.mark.parametrize(
    "first",
    [
        UploadPlan(end=UploadEnd.DROPPED, code=None, fraction=0.5, message="the device closed the data connection"),
        UploadPlan(end=UploadEnd.TIMEOUT, code=None, fraction=0.3, message="the data connection stalled"),
        UploadPlan(end=UploadEnd.REFUSED, code=550, fraction=0.0, message="550 an earlier upgrade is still running"),
        UploadPlan(end=UploadEnd.UNREACHABLE, code=None, fraction=0.0, message="connection refused"),
        UploadPlan(end=UploadEnd.TIMEOUT, code=None, message="no 226 after the clean close", accepted=False),
    ],
    ids=["drop", "stall", "busy", "unreachable", "no 226"],
)
def test_an_upload_that_left_the_old_bank_bootable_is_retried_from_the_start(world, first):
    world.device.uploads.appendleft(first)
    outcome = world.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert world.uploads() == 2 and outcome.details["upload_attempts"] == 2
    attempts = [e.message for e in world.events if isinstance(e, PhaseChanged) and e.phase is Phase.UPLOAD]
    assert attempts[1].startswith("attempt 2: the upload starts again from the beginning")
    assert first.message in attempts[1]


def test_a_clean_close_without_226_whose_device_rebooted_is_not_uploaded_twice(world):
    world.device.uploads[0] = UploadPlan(end=UploadEnd.TIMEOUT, code=None, clean_close=True, accepted=True)
    outcome = world.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED and world.uploads() == 1


def test_retries_back_off_and_end_at_the_deadline(world):
    world.device.uploads[0] = UploadPlan(end=UploadEnd.DROPPED, code=None, fraction=0.2, seconds=1.0, message="dropped")
    outcome = world.run(deadline=100.0)
    assert (outcome.kind, outcome.failure, outcome.phase) == (OutcomeKind.FAILED, FailureClass.TIMEOUT, Phase.UPLOAD)
    assert "deadline of 100 s passed during upload" in outcome.message
    assert outcome.advice == ADVICE_UPLOAD_INCOMPLETE
    starts = [c.time for c in world.link.calls if c.what == "upload"]
    gaps = [b - a - 1.0 for a, b in itertools.pairwise(starts)]
    assert gaps[:4] == pytest.approx([1.0, 2.0, 4.0, 8.0])  # the backoff doubles


@pytest.mark.parametrize(
    ("plan", "failure"),
    [
        (
            UploadPlan(end=UploadEnd.REFUSED, code=503, fraction=0.0, message="503 Login incorrect"),
            FailureClass.DEVICE_REFUSED,
        ),
        (
            UploadPlan(end=UploadEnd.REFUSED, code=553, fraction=0.0, message="553 not allowed"),
            FailureClass.DEVICE_REFUSED,
        ),
        (
            UploadPlan(end=UploadEnd.PROTOCOL_ERROR, code=None, fraction=0.0, message="not FTP"),
            FailureClass.PROTOCOL_ERROR,
        ),
    ],
    ids=["login", "other 5xx", "protocol"],
)
def test_what_retrying_cant_mend_fails_at_once(world, plan, failure):
    world.device.uploads[0] = plan
    outcome = world.run()
    assert (outcome.kind, outcome.failure, outcome.phase) == (OutcomeKind.FAILED, failure, Phase.UPLOAD)
    assert world.uploads() == 1 and plan.message in outcome.message
    assert outcome.advice == ADVICE_UPLOAD_INCOMPLETE


def test_a_226_without_a_reboot_means_the_device_did_not_accept_the_image(world):
    world.device.uploads[0] = UploadPlan(accepted=False)
    outcome = world.run(upload_reboot=20.0)
    assert (outcome.kind, outcome.failure, outcome.phase) == (
        OutcomeKind.FAILED,
        FailureClass.DEVICE_ERROR,
        Phase.REBOOT,
    )
    assert "not seen to reboot within 20 s" in outcome.message and outcome.advice == ADVICE_NOT_ACCEPTED
    assert world.uploads() == 1  # a whole image the device did not take is not sent again


def test_a_reboot_quicker_than_the_polls_shows_in_the_new_version_and_succeeds(tmp_path):
    world = World(tmp_path, image_bytes_of("double"))
    world.device.new_firmware_seconds = 0.0  # away and back between two polls: never seen away
    outcome = world.run(upload_reboot=20.0)
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert (outcome.firmware_version_before, outcome.firmware_version_after) == ("1.0.0", "2.0.0")
    assert world.uploads() == 1


def test_a_quick_reboot_of_a_build_with_a_fixed_version_is_not_seen_and_the_advice_says_to_check(tmp_path):
    world = World(tmp_path, image_bytes_of("double"))
    world.device.new_firmware_seconds = 0.0
    world.device.fixed_version = True  # nothing in its answers changes: netota can't tell
    outcome = world.run(upload_reboot=20.0)
    assert (outcome.kind, outcome.phase) == (OutcomeKind.FAILED, Phase.REBOOT)
    assert "most likely" in outcome.message and "firmware_version" in outcome.advice


def test_a_cancel_mid_upload_resets_the_data_connection_and_the_old_firmware_is_intact(world):
    job = UpgradeJob(world.clock, TARGET, world.image, UpgradeTimeouts(), "job-1", link=world.link)
    job.run()
    run_until(world.clock, lambda: "upload" in world.link.names())
    world.clock.advance(1.5)
    job.cancel("operator")
    outcome = run_to_end(world.clock, job)
    assert (outcome.kind, outcome.phase) == (OutcomeKind.ABORTED, Phase.UPLOAD)
    assert outcome.advice == ADVICE_UPLOAD_INCOMPLETE and "old firmware" in outcome.advice
    assert len(world.link.upload_resets) == 1
    assert world.device.mode is Mode.MAIN and world.device.version == "1.0.0"  # nothing was burned


def test_a_cancel_after_the_image_went_out_whole_says_the_device_may_still_take_it(world):
    job = UpgradeJob(world.clock, TARGET, world.image, UpgradeTimeouts(), "job-1", link=world.link)
    job.events.subscribe(world.events.append)
    job.run()
    run_until(
        world.clock,
        lambda: any(isinstance(e, Progress) and e.state is TransferState.DEVICE_WORKING for e in world.events),
    )
    job.cancel("operator")
    outcome = run_to_end(world.clock, job)
    assert (outcome.kind, outcome.phase) == (OutcomeKind.ABORTED, Phase.UPLOAD)
    assert outcome.advice == ADVICE_UPLOAD_UNSETTLED  # not "the old firmware is intact": it may not be


def test_a_cancel_while_waiting_for_the_reboot_does_not_claim_the_old_firmware_is_intact(world):
    world.device.uploads[0] = UploadPlan(accepted=False)
    job = UpgradeJob(world.clock, TARGET, world.image, UpgradeTimeouts(upload_reboot=60.0), "job-1", link=world.link)
    job.events.subscribe(world.events.append)
    job.run()
    run_until(world.clock, lambda: Phase.REBOOT in world.phases())
    world.clock.advance(5.0)
    job.cancel("operator")
    outcome = run_to_end(world.clock, job)
    assert (outcome.kind, outcome.phase) == (OutcomeKind.ABORTED, Phase.REBOOT)
    assert outcome.advice == ADVICE_UPLOAD_UNSETTLED and world.uploads() == 1


def test_the_deadline_while_waiting_for_the_reboot_leaves_the_outcome_unsettled(world):
    world.device.uploads[0] = UploadPlan(accepted=False)
    outcome = world.run(upload_reboot=60.0, deadline=20.0)
    assert (outcome.kind, outcome.failure, outcome.phase) == (OutcomeKind.FAILED, FailureClass.TIMEOUT, Phase.REBOOT)
    assert outcome.advice == ADVICE_UPLOAD_UNSETTLED and world.uploads() == 1


def test_a_new_firmware_that_never_answers_after_the_reboot_is_unverified(world):
    world.device.new_firmware_silent = True
    world.device.bank_switched = lambda: setattr(world.device, "mode", Mode.DOWN)  # it reboots and stays away
    outcome = world.run(verify=30.0)
    assert (outcome.kind, outcome.phase) == (OutcomeKind.UNVERIFIED, Phase.VERIFY)


# -- image kinds ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_kind", "ota_type", "words"),
    [("single", "0", "single backup"), ("double", "1", "double backup")],
)
def test_an_image_of_the_other_kind_is_refused_before_anything_is_sent(tmp_path, image_kind, ota_type, words):
    world = World(tmp_path, image_bytes_of(image_kind), ota_type=ota_type)
    outcome = world.run()
    assert (outcome.kind, outcome.phase) == (OutcomeKind.NOT_APPLICABLE, Phase.DETECT)
    assert (
        words in outcome.message and "can't cross-upgrade" in outcome.message and "nothing was sent" in outcome.message
    )
    assert world.link.names() == ["fetch"]  # the description document, and nothing else


def test_an_image_of_unknown_kind_goes_ahead_with_a_warning(tmp_path):
    world = World(tmp_path, bytes(range(256)) * (IMAGE_SIZE // 256))
    with capturedLogs() as events:
        outcome = world.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED
    assert any("can't be told from its bytes" in e.get("log_format", "") for e in events)


def test_a_damaged_test_image_is_refused_before_anything_is_sent(tmp_path):
    world = World(tmp_path, image_bytes_of("double", damaged=True))
    outcome = world.run()
    assert (outcome.kind, outcome.failure) == (OutcomeKind.FAILED, FailureClass.FIRMWARE_FILE)
    assert "damaged" in outcome.message and world.link.names() == ["fetch"]


def test_a_downgrade_is_said_plainly_before_it_starts(tmp_path):
    world = World(tmp_path, image_bytes_of("single", version="0.9.0"), ota_type="1")
    world.device.phase2[0] = StreamPlan(all_size=True)
    outcome = world.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED
    notes = [e.message for e in world.events if isinstance(e, PhaseChanged) and e.phase is Phase.DETECT]
    assert "downgrade: the device runs firmware 1.0.0, the image is version 0.9.0" in notes


# -- a rack of both kinds: one job, several images --------------------------------------------------


def job_with(tmp_path, world: World, *images: bytes) -> UpgradeJob:
    paths = []
    for index, data in enumerate(images):
        path = tmp_path / f"image-{index}.bin"
        path.write_bytes(data)
        paths.append(FirmwareImage(path))
    return UpgradeJob(world.clock, TARGET, paths, UpgradeTimeouts(), "job-1", link=world.link)


@pytest.mark.parametrize("ota_type", ["0", "1"])
def test_with_one_image_of_each_kind_the_job_sends_the_devices_own(tmp_path, ota_type):
    world = World(tmp_path, image_bytes_of("double"), ota_type=ota_type)
    job = job_with(
        tmp_path, world, image_bytes_of("single", version="2.1.0"), image_bytes_of("double", version="2.2.0")
    )
    outcome = run_to_end(world.clock, job)
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    sent = world.link.uploaded_images if ota_type == "0" else world.link.streamed_images
    assert {image.path.name for image in sent} == {"image-1.bin" if ota_type == "0" else "image-0.bin"}
    assert outcome.details["image"].endswith("image-1.bin" if ota_type == "0" else "image-0.bin")


def test_two_images_of_the_devices_kind_are_ambiguous_and_nothing_is_sent(tmp_path):
    world = World(tmp_path, image_bytes_of("double"))
    job = job_with(
        tmp_path, world, image_bytes_of("double", version="2.1.0"), image_bytes_of("double", version="2.2.0")
    )
    outcome = run_to_end(world.clock, job)
    assert outcome.kind is OutcomeKind.NOT_APPLICABLE and "more than one" in outcome.message
    assert world.link.names() == ["fetch"]


def test_none_of_the_devices_kind_is_refused_naming_each_image(tmp_path):
    world = World(tmp_path, image_bytes_of("double"))
    job = job_with(tmp_path, world, image_bytes_of("single"), image_bytes_of("single", version="2.2.0"))
    outcome = run_to_end(world.clock, job)
    assert outcome.kind is OutcomeKind.NOT_APPLICABLE
    assert "image-0.bin is simulator test image, single backup" in outcome.message and world.link.names() == ["fetch"]


def test_a_device_that_goes_silent_without_refusing_is_seen_to_go_after_two_misses(world):
    """After its reset a real device's address may just go silent (no refusal): a fetch without an
    answer within a second is a miss, and two in a row are its absence (not a fetch left to wait its
    whole http timeout)."""
    device = world.device

    def goes_silent() -> None:
        def go() -> None:
            device.timers.discard(call)
            device.mode = Mode.GONE  # connections hang, fetches get no answer
            back = device.clock.callLater(
                5.0, lambda: (device.timers.discard(back), setattr(device, "mode", Mode.MAIN))
            )
            device.timers.add(back)
            device.version = device.new_version

        call = device.clock.callLater(2.0, go)
        device.timers.add(call)

    device.bank_switched = goes_silent
    outcome = world.run(http=10.0, poll_interval=1.0)
    assert outcome.kind is OutcomeKind.SUCCEEDED and outcome.firmware_version_after == "2.0.0", outcome
    silent = [c.time for c in world.link.calls if c.what == "fetch" and c.detail["mode"] == "gone"]
    # the reboot wait's two misses, each cut at the 1 s presence check (then at most poll_interval
    # apart); verify's first fetch follows the second at once
    assert silent[1] - silent[0] <= 1.0 + 1.0
    assert silent[2] - silent[1] == pytest.approx(1.0)


def test_one_slow_answer_is_not_a_reboot(world):
    """A device that did not take the image but lost one packet on the WiFi (one fetch without an
    answer) is not taken for one that rebooted: the upload is reported not accepted, not a success."""
    device = world.device
    device.uploads[0] = UploadPlan(accepted=False)
    slow = {"left": 1}

    def one_slow_fetch(d: FakeDevice):
        if slow["left"] and "upload_end" in world.link.names():
            slow["left"] -= 1
            d.fetch_hangs = True
            d.clock.callLater(0, setattr, d, "fetch_hangs", False)  # only this fetch
        return None

    device.description_override = one_slow_fetch
    outcome = world.run(upload_reboot=20.0)
    assert (outcome.kind, outcome.failure, outcome.phase) == (
        OutcomeKind.FAILED,
        FailureClass.DEVICE_ERROR,
        Phase.REBOOT,
    )
    assert slow["left"] == 0
