"""The double-backup route (``ota_type`` "0" or absent): one FTP upload into the inactive bank.

::

    UPLOAD  FTP login, TYPE I, PASV, STOR update-ota.ufw, the image, a clean close, 226, QUIT;
            retried from the start with a backoff after anything that left the old bank bootable
            (a drop, a stall, 550 busy, no 226), until the deadline
    REBOOT  the device going away shortly after the 226 is its sign that it took the image; no
            reboot within ``upload_reboot`` seconds means it did not: failed, with advice
    (then VERIFY, as for single backup: the description document answers again; the version)

The device's FTP server answers the same 226 on success and on failure (``docs/protocol.md``), so
only its reboot tells. A cancel resets the data connection (an RST burns nothing) and never sends
ABOR: the old firmware is intact. There is no point of no return and no loader.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.internet import backoffPolicy
from twisted.logger import Logger

from netota_daemon.engine.outcome import FailureClass, Phase, UpgradeFailed
from netota_daemon.engine.steps import JobSteps, RouteEnd
from netota_daemon.firmware import FirmwareImage
from netota_daemon.protocols.ftp_upload import UploadEnd, UploadResult
from netota_daemon.wire.description import DeviceDescription

log = Logger()

#: "Busy": an earlier upload is still being closed or timing out on the device.
BUSY = 550


def upload_backoff() -> Callable[[int], float]:
    """1 s, then doubling up to 30 s: the device's own timeouts (a burn, a busy file) are seconds long."""
    return backoffPolicy(initialDelay=1.0, maxDelay=30.0, factor=2.0, jitter=lambda: 0.0)


async def upgrade_double_backup(steps: JobSteps, image: FirmwareImage) -> RouteEnd:
    steps.set_phase(Phase.UPLOAD, f"FTP upload to port {steps.target.ftp_port} into the device's second bank")
    facts = steps.facts
    delay = upload_backoff()
    while True:
        facts.upload_attempts += 1
        steps.begin_attempt(Phase.UPLOAD, facts.upload_attempts, "the upload starts again from the beginning")
        result = await steps.upload(image)
        facts.uploads.append(
            {
                "end": result.end.value,
                "bytes_sent": result.bytes_sent,
                "code": result.code,
                "server": result.server,
                "clean_close": result.clean_close,
            }
        )
        if result.end is UploadEnd.COMPLETE or result.clean_close:
            # The whole image went out and was closed cleanly: only the device's reboot tells
            # whether it took it (a 226 is the same on failure).
            if await _rebooted(steps, result):
                return RouteEnd.UPGRADED
            if result.end is UploadEnd.COMPLETE:
                raise UpgradeFailed(
                    FailureClass.DEVICE_ERROR,
                    f"the device answered the upload ({result.bytes_sent} bytes) but was not seen to reboot "
                    f"within {steps.timeouts.upload_reboot:g} s (it kept answering, with the same firmware "
                    "version): it most likely did not accept the image",
                )
        elif not worth_retrying(result):
            raise UpgradeFailed(_failure_class(result), f"upload: {result.message}")
        facts.last_problem = result.message
        log.info(
            "upload attempt {attempt} failed ({problem}); starting again",
            attempt=facts.upload_attempts,
            problem=result.message,
            **steps.log_context,
        )
        await steps.sleep(delay(facts.upload_attempts - 1))


async def _rebooted(steps: JobSteps, result: UploadResult) -> bool:
    steps.set_phase(Phase.REBOOT, "the device should reboot into its new bank about 2 s after the upload")
    before = steps.facts.version_before

    def new_version_shown(description: DeviceDescription) -> bool:
        # Another firmware_version than before the upload: the new bank booted (a stock build whose
        # version string is fixed shows nothing here, and needs its reboot to be seen).
        return before is not None and description.firmware_version not in (None, before)

    gone = await steps.wait_until_gone(
        steps.timeouts.upload_reboot, "waiting for the device to reboot", back_changed=new_version_shown
    )
    if not gone:
        log.warn(
            "the device still answers {seconds:g} s after the upload ({end}): it did not take the image",
            seconds=steps.timeouts.upload_reboot,
            end=result.end.value,
            **steps.log_context,
        )
    return gone


def worth_retrying(result: UploadResult) -> bool:
    """Whether the old bank is still what boots and another attempt may work."""
    if result.end is UploadEnd.REFUSED:
        return result.code is not None and (result.code == BUSY or 400 <= result.code < 500)
    return result.end in (UploadEnd.DROPPED, UploadEnd.TIMEOUT, UploadEnd.UNREACHABLE)


def _failure_class(result: UploadResult) -> FailureClass:
    if result.end is UploadEnd.REFUSED:
        return FailureClass.DEVICE_REFUSED
    if result.end is UploadEnd.PROTOCOL_ERROR:
        return FailureClass.PROTOCOL_ERROR
    return FailureClass.CONNECTION
