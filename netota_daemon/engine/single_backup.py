"""The single-backup route (``ota_type`` "1"): phase 1, the reboot into the loader, phase 2.

::

    PHASE1  CTP APP_ACCESS, NET_OTA_SINGLE, keep-alive, OTA stream (forward reads)  -> OK / SAME
    REBOOT  optional reconnect hook; poll the description document until the loader answers
    PHASE2  CTP APP_ACCESS, description document, OTA stream; retried from the start after a
            dropped session, a timeout or the loader's ERR (the loader allows it), until the deadline

Phase 1 is not retried (the old firmware is intact: a person should see it and reset the device).
"""

from __future__ import annotations

from twisted.logger import Logger

from netota_daemon.engine.outcome import FailureClass, Phase, UpgradeFailed
from netota_daemon.engine.retry import RetriesExhausted
from netota_daemon.engine.steps import JobSteps, RouteEnd
from netota_daemon.firmware import FirmwareImage
from netota_daemon.protocols.endpoints import connection_error_message
from netota_daemon.protocols.ota_stream import StreamEnd, StreamResult
from netota_daemon.wire.description import DeviceDescription

log = Logger()


async def upgrade_single_backup(steps: JobSteps, description: DeviceDescription, image: FirmwareImage) -> RouteEnd:
    """Both phases (or phase 2 alone when the device is already in its loader)."""
    if description.in_loader:
        log.info("the device is already in its update loader: resuming at phase 2", **steps.log_context)
    else:
        if await _phase1(steps, image) is StreamEnd.SAME:
            return RouteEnd.ALREADY_CURRENT
        await _wait_for_loader(steps)
    await _phase2(steps, image)
    return RouteEnd.UPGRADED


async def _phase1(steps: JobSteps, image: FirmwareImage) -> StreamEnd:
    steps.set_phase(Phase.PHASE1, "main firmware: NET_OTA_SINGLE, then the first stream")
    ctp = await steps.open_ctp()
    try:
        await steps.ctp_step(ctp.app_access(steps.timeouts.ctp_reply), "APP_ACCESS")
        status = await steps.ctp_step(ctp.net_ota_single(steps.timeouts.ctp_reply), "NET_OTA_SINGLE")
        if status != "1":
            raise UpgradeFailed(
                FailureClass.DEVICE_REFUSED,
                f"the device refused NET_OTA_SINGLE (status {status!r}): it can't start a single-backup upgrade",
            )
        ctp.start_keepalive(steps.timeouts.keepalive_interval)
        result = await steps.stream(Phase.PHASE1, image)
        steps.facts.phase1_completed = result.end is StreamEnd.OK  # the device now reboots into its loader
    finally:
        await steps.close_ctp(ctp)
    if result.end is StreamEnd.OK or result.end is StreamEnd.SAME:
        return result.end
    if result.end is StreamEnd.ERR:
        raise UpgradeFailed(
            FailureClass.DEVICE_ERROR,
            "the device ended phase 1 with ERR: it rejected the image (current firmware also answers "
            "ERR when this image is the one already installed)",
        )
    raise UpgradeFailed(stream_failure_class(result.end), f"phase 1: {result.message}")


async def _wait_for_loader(steps: JobSteps) -> None:
    steps.set_phase(Phase.REBOOT, "the device reboots into its update loader")
    await steps.run_reconnect_hook()
    try:
        await steps.poll_description(lambda d: d.in_loader, steps.timeouts.reboot, "waiting for the update loader")
    except RetriesExhausted as e:
        raise UpgradeFailed(
            FailureClass.TIMEOUT,
            f"the device did not come back in its update loader within {steps.timeouts.reboot:g} s "
            f"(last: {connection_error_message(e.last_error)})",
        ) from None


async def _phase2(steps: JobSteps, image: FirmwareImage) -> None:
    steps.set_phase(Phase.PHASE2, "update loader: the second stream rewrites flash")
    facts = steps.facts
    errors_left = steps.behaviour.phase2_error_retries
    while True:
        facts.phase2_attempts += 1
        steps.begin_attempt(Phase.PHASE2, facts.phase2_attempts, "the loader reads the image again from the start")
        try:
            result = await _phase2_attempt(steps, image)
        except UpgradeFailed as e:
            if e.failure not in (FailureClass.CONNECTION, FailureClass.TIMEOUT):
                raise
            facts.last_problem = e.message
        else:
            if result.end is StreamEnd.OK:
                return
            if result.end is StreamEnd.SAME:
                # The loader's code never sends SAME (a zero-length update is its ERR): whatever it
                # means here, the device stays in its loader, so it is no "already current".
                when = "after the all_size notice" if steps.point_of_no_return else "before rewriting flash"
                raise UpgradeFailed(
                    FailureClass.DEVICE_ERROR,
                    f"the update loader answered SAME {when}, which its code never sends; the device "
                    "stays in its loader",
                )
            if result.end is StreamEnd.ERR:
                if errors_left <= 0:
                    raise UpgradeFailed(
                        FailureClass.DEVICE_ERROR,
                        f"the update loader ended phase 2 with ERR ({facts.phase2_attempts} attempt(s)): "
                        "it rejected the image",
                    )
                errors_left -= 1
            elif result.end is StreamEnd.PROTOCOL_ERROR:
                raise UpgradeFailed(FailureClass.PROTOCOL_ERROR, f"phase 2: {result.message}")
            facts.last_problem = result.message
        log.info(
            "phase 2 attempt {attempt} failed ({problem}); starting again",
            attempt=facts.phase2_attempts,
            problem=facts.last_problem,
            **steps.log_context,
        )
        await steps.sleep(steps.timeouts.poll_interval)


async def _phase2_attempt(steps: JobSteps, image: FirmwareImage) -> StreamResult:
    ctp = await steps.open_ctp()
    try:
        await steps.ctp_step(ctp.app_access(steps.timeouts.ctp_reply), "APP_ACCESS")
    finally:
        await steps.close_ctp(ctp)  # the loader answers one frame per connection, then ignores it
    description = await steps.fetch_description_retrying(
        steps.timeouts.connect_window, "reading the loader's description"
    )
    if description.single_backup and description.ota_step == "0":
        if not steps.point_of_no_return:
            # No phase-2 stream got as far as the all_size notice, so the loader never began to
            # rewrite flash: the device fell back to its old firmware, nothing was upgraded.
            steps.facts.old_firmware_back = True
            raise UpgradeFailed(
                FailureClass.DEVICE_ERROR,
                "the device left its update loader before phase 2 began rewriting flash: it runs its main "
                f"firmware again (version {description.firmware_version or 'unknown'}); no phase-2 session of "
                "this job reached the all_size notice, so this job upgraded nothing",
            )
        # The loader was rewriting flash, and now the main firmware answers: the loader finished
        # (its OK was lost with the connection) and rebooted. VERIFY reads the version back.
        log.warn("the device left its update loader between two phase-2 attempts", **steps.log_context)
        return StreamResult(StreamEnd.OK, "the device left its update loader: phase 2 completed")
    if not description.in_loader:
        raise UpgradeFailed(
            FailureClass.PROTOCOL_ERROR,
            f"expected the update loader (ota_type 1, ota_step 1), the device answered ota_type "
            f"{description.ota_type!r} ota_step {description.ota_step!r}",
        )
    return await steps.stream(Phase.PHASE2, image)


def stream_failure_class(end: StreamEnd) -> FailureClass:
    return {
        StreamEnd.DROPPED: FailureClass.CONNECTION,
        StreamEnd.TIMEOUT: FailureClass.TIMEOUT,
        StreamEnd.PROTOCOL_ERROR: FailureClass.PROTOCOL_ERROR,
        StreamEnd.ERR: FailureClass.DEVICE_ERROR,
    }.get(end, FailureClass.PROTOCOL_ERROR)
