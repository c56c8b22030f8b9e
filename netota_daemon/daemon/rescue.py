"""Rescue: finish the upgrade of a device found waiting in its phase-2 loader with no job running.

Such a device can't boot its firmware until an upgrade completes, so a rack must never leave it
there. :func:`plan_rescue` decides, from the device's probe and the journal's jobs for it, what to
do; it never guesses an image:

- the device's newest job that flashed (it reached the reboot after phase 1, or phase 2) is what left
  it in the loader: a job that can still be resumed is **resumed** (the engine goes straight to phase
  2); one that can't (it was resumed already, or ended otherwise) gives its image to a **new job**;
- that image must still be the same file: a job that recorded its image's SHA-256 is compared with the
  file as it is now, and a changed or missing file is refused;
- with no such job in the journal (or a refused image) the answer says so, and that the operator must
  name the image (``netota rescue DEVICE --firmware FILE``); an image the operator names is used as
  given (its kind is still checked: a double-backup image can't finish a single-backup loader).

:class:`Rescuer` carries plans out through the job queue; with ``daemon.rescue = true`` the daemon
probes its idle devices every ``rescue_interval`` seconds and rescues what it can on its own
(:meth:`Rescuer.sweep`), logging, at most once per device and interval, what it can't.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from netota_daemon.daemon.batches import QueueRefused
from netota_daemon.daemon.image_facts import FirmwareProblem, ImageFacts
from netota_daemon.protocols.log_limit import LogLimiter

log = Logger()

#: How many of a device's newest jobs are read to find the one that left it in its loader.
JOBS_LOOKED_AT = 20
#: Phases that mean a job flashed the device's loader (phase 1 completed) or rewrote flash.
FLASHING_PHASES = ("reboot", "phase2", "verify", "done")


class RescueAction(str, enum.Enum):
    RESUME = "resume"  # resume the job that left the device in its loader
    START = "start"  # a new job with the image the journal (or the operator) names
    NONE = "none"  # nothing to rescue: not in its loader, busy, or not reachable
    NEEDS_FIRMWARE = "needs_firmware"  # in its loader, but no image is known: the operator must give one


@dataclass(frozen=True)
class RescuePlan:
    device: str
    action: RescueAction
    message: str
    job: str | None = None  # the job to resume, or the one whose image is used
    firmware: str | None = None
    started: str | None = None  # the job started (resumed or new), once carried out

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "action": self.action.value,
            "message": self.message,
            "job": self.job,
            "firmware": self.firmware,
            "started": self.started,
        }


def _flashed(job: Mapping[str, Any]) -> bool:
    return bool(job.get("point_of_no_return")) or job.get("phase") in FLASHING_PHASES


def _resumable(job: Mapping[str, Any]) -> bool:
    return bool(job.get("resumable"))


def plan_rescue(
    device: str,
    probe: Any,
    busy_job: str | None,
    jobs: Sequence[Mapping[str, Any]],
    images: Mapping[str, ImageFacts | FirmwareProblem],
    firmware: str | None = None,
) -> RescuePlan:
    """What to do for ``device``.

    ``probe``: its probe result (``ok``, ``mode``, ``error``); ``busy_job``: the job that holds it now,
    if any; ``jobs``: its newest jobs, newest first (their JSON); ``images``: each firmware name
    involved (``firmware`` and the jobs' ones) as it is now, or why it can't be used; ``firmware``:
    the image the operator named, if any."""
    if busy_job is not None:
        return RescuePlan(device, RescueAction.NONE, f"{device} has a job running ({busy_job}): nothing to rescue")
    if probe is None or not getattr(probe, "ok", False):
        error = getattr(probe, "error", None) or "no answer"
        return RescuePlan(device, RescueAction.NONE, f"{device} did not answer the probe ({error}): nothing done")
    mode = getattr(probe, "mode", None)
    if mode != "loader":
        version = getattr(probe, "firmware_version", None)
        running = f"its {'main' if mode == 'main' else mode} firmware" + (f" {version}" if version else "")
        return RescuePlan(
            device, RescueAction.NONE, f"{device} is not in its loader (it runs {running}): nothing to rescue"
        )

    def usable(name: str, what: str) -> str | None:
        """Why the image ``name`` can't finish this loader, or None."""
        facts = images.get(name)
        if isinstance(facts, FirmwareProblem):
            return f"{what} {name} can't be used now: {facts.message}"
        if facts is None:
            return f"{what} {name} could not be read"
        if facts.kind == "double_backup":
            return f"{what} {name} is a double-backup image; a single-backup loader can't take it"
        return None

    if firmware is not None:
        problem = usable(firmware, "the firmware")
        if problem:
            return RescuePlan(device, RescueAction.NEEDS_FIRMWARE, f"{device} waits in its loader, but {problem}")
        return RescuePlan(
            device,
            RescueAction.START,
            f"{device} waits in its loader: phase 2 with {firmware}, the image given",
            firmware=firmware,
        )
    last = next((job for job in jobs if _flashed(job)), None)
    if last is None:
        return RescuePlan(
            device,
            RescueAction.NEEDS_FIRMWARE,
            f"{device} waits in its loader and the journal knows no job that flashed it: "
            f"name the image (netota rescue {device} --firmware FILE)",
        )
    job_id = str(last.get("id"))
    # A job given a set of images (one of each kind): the single-backup one finishes a loader.
    names = [str(n) for n in (last.get("firmware_set") or [last.get("firmware")])]
    name = next((n for n in names if usable(n, "") is None), names[0])
    problem = usable(name, f"the image of job {job_id},")
    if problem is None:
        recorded, facts = last.get("image_sha256"), images.get(name)
        if recorded and isinstance(facts, ImageFacts) and facts.sha256 != recorded:
            problem = f"the image of job {job_id}, {name}, changed since that job flashed it"
    if problem is not None:
        return RescuePlan(
            device,
            RescueAction.NEEDS_FIRMWARE,
            f"{device} waits in its loader, but {problem}: name the image (netota rescue {device} --firmware FILE)",
            job=job_id,
        )
    checked = (
        "" if last.get("image_sha256") else " (its content could not be checked: the job predates image checksums)"
    )
    if _resumable(last):
        return RescuePlan(
            device,
            RescueAction.RESUME,
            f"{device} waits in its loader: resuming job {job_id} (phase 2 with {name}){checked}",
            job=job_id,
            firmware=name,
        )
    return RescuePlan(
        device,
        RescueAction.START,
        f"{device} waits in its loader: phase 2 with {name}, the image of job {job_id}{checked}",
        job=job_id,
        firmware=name,
    )


class RescueQueue(Protocol):
    """What rescue needs of the job queue; refusals are :class:`QueueRefused` failures."""

    def start(self, device: str, firmware: str) -> Deferred[dict[str, Any]]: ...

    def resume(self, job_id: str) -> Deferred[dict[str, Any]]: ...

    def device_jobs(self, device: str, limit: int) -> Deferred[list[dict[str, Any]]]:
        """The device's newest jobs, newest first."""
        ...


class Rescuer:
    """Plans and carries out rescues (see the module docstring)."""

    def __init__(
        self,
        clock: IReactorTime,
        queue: RescueQueue,
        probe: Callable[[Iterable[str]], Awaitable[Mapping[str, Any]]],
        inspect: Callable[[str], Awaitable[ImageFacts]],
        busy: Callable[[str], str | None],
        devices: Sequence[str],
        log_interval: float = 600.0,
    ) -> None:
        self.clock = clock
        self.queue = queue
        self.probe = probe
        self.inspect = inspect
        self.busy = busy
        self.devices = list(devices)
        self.warnings = LogLimiter(clock, log, burst=1, interval=log_interval)
        self._sweeping = False

    async def _images(self, names: Iterable[str]) -> dict[str, ImageFacts | FirmwareProblem]:
        images: dict[str, ImageFacts | FirmwareProblem] = {}
        for name in dict.fromkeys(names):
            try:
                images[name] = await self.inspect(name)
            except FirmwareProblem as e:
                images[name] = e
        return images

    async def plan(self, devices: Sequence[str] | None = None, firmware: str | None = None) -> list[RescuePlan]:
        wanted = list(dict.fromkeys(devices or self.devices))
        idle = [d for d in wanted if self.busy(d) is None]
        probes = await self.probe(idle) if idle else {}
        plans = []
        for device in wanted:
            busy = self.busy(device)
            result = probes.get(device)
            in_loader = busy is None and result is not None and getattr(result, "mode", None) == "loader"
            jobs = await self.queue.device_jobs(device, JOBS_LOOKED_AT) if in_loader and firmware is None else []
            last = next((j for j in jobs if _flashed(j)), None)
            names = (
                [firmware]
                if firmware
                else [str(n) for n in (last.get("firmware_set") or [last.get("firmware")])]
                if last
                else []
            )
            images = await self._images(names) if in_loader else {}
            plans.append(plan_rescue(device, result, busy, jobs, images, firmware))
        return plans

    async def carry_out(self, plan: RescuePlan) -> RescuePlan:
        """Resume or start what ``plan`` says; the plan with ``started`` set, or with the refusal."""
        try:
            if plan.action is RescueAction.RESUME and plan.job:
                job = await self.queue.resume(plan.job)
            elif plan.action is RescueAction.START and plan.firmware:
                job = await self.queue.start(plan.device, plan.firmware)
            else:
                return plan
        except QueueRefused as e:
            return RescuePlan(
                plan.device, RescueAction.NONE, f"{plan.message}: refused: {e.message}", plan.job, plan.firmware
            )
        log.warn("rescue of {device}: {message}: job {job}", device=plan.device, message=plan.message, job=job["id"])
        return RescuePlan(plan.device, plan.action, plan.message, plan.job, plan.firmware, started=str(job["id"]))

    async def rescue(self, devices: Sequence[str] | None = None, firmware: str | None = None) -> list[RescuePlan]:
        """``netota rescue``: plan every device named (default: all) and carry the plans out."""
        return [await self.carry_out(plan) for plan in await self.plan(devices, firmware)]

    async def sweep(self) -> list[RescuePlan]:
        """The periodic check (``daemon.rescue = true``): rescue the idle devices found in their loader
        whose image the journal knows; log (rate-limited) the ones it can't."""
        if self._sweeping:
            return []  # the previous sweep is still probing
        self._sweeping = True
        try:
            done = []
            for plan in await self.plan():
                if plan.action is RescueAction.NEEDS_FIRMWARE:
                    self.warnings.warn(
                        f"rescue:{plan.device}",
                        f"rescue warnings for {plan.device}",
                        "rescue: {message}",
                        message=plan.message,
                        device=plan.device,
                    )
                elif plan.action is not RescueAction.NONE:
                    done.append(await self.carry_out(plan))
            return done
        finally:
            self._sweeping = False
