"""``netota devices|upgrade|jobs|show|watch|cancel|resume``: the daemon's command-line client.

The commands: their arguments, the requests each makes, what each prints and its exit code
(:mod:`netota_daemon.cli.exit_codes`). The talking to the daemon is
:mod:`netota_daemon.cli.control_client` (HTTP+JSON to the control API, ``--control`` or
``$NETOTA_CONTROL``; a UNIX socket by default); a followed job's server-sent events are drawn by
:mod:`netota_daemon.cli.progress` (one line per device, :class:`~netota_daemon.cli.progress.DeviceBoard`,
when it follows several); values are written as :mod:`netota_daemon.cli.text` spells them.

``--json`` prints what the API answered, in its own shape: ``{"devices": [...]}``, ``{"jobs": [...],
"next_cursor": ...}``, ``{"job": {...}}``; ``watch --json`` prints the API's events as JSON lines.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import urllib.parse
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, gatherResults

from netota_daemon.cli.control_client import (
    ApiRefused,
    DaemonUnavailable,
    event_from_json,
    progress_from_json,
)
from netota_daemon.cli.exit_codes import (
    EXIT_CANT_CREATE,
    EXIT_UNAVAILABLE,
    exit_code,
)
from netota_daemon.cli.junit import CaseResult, JUnitError, case_from_job, check_junit_path, write_junit
from netota_daemon.cli.output import print_json
from netota_daemon.cli.progress import DeviceBoard, ProgressRenderer, colour_wanted
from netota_daemon.cli.runner import DEFAULT_CONTROL, Command, add_client_command, refusal_text
from netota_daemon.cli.text import (
    dash,
    format_bytes,
    format_elapsed,
    format_short_time,
    format_time,
    human_text,
    kind_label,
    outcome_text,
    phase_text,
    table,
    yes_no,
)
from netota_daemon.engine.events import Finished, PhaseChanged
from netota_daemon.engine.outcome import Outcome, OutcomeKind, Phase

ACTIVE_STATES = ("queued", "running", "cancelling")


# ---------------------------------------------------------------- how a job is told


def outcome_line(job: dict[str, Any]) -> str:
    """A job in one line (and its advice on a second when it ended badly):
    ``job 3f2a on shelf1: succeeded: the device now runs firmware 2.0.0``."""
    head = f"job {job['id']} on {job['device']}"
    outcome = job.get("outcome")
    if job.get("state") == "interrupted":
        text = f"{head}: interrupted {_where(job)}"
    elif outcome:
        text = f"{head}: {outcome_text(outcome['kind'], outcome.get('message') or '', outcome.get('failure'))}"
        after = outcome.get("firmware_version_after")
        if after and after not in text:
            text += f" (firmware {after})"
    else:
        text = f"{head}: {job['state']}"
        if job.get("position"):
            text += f" (position {job['position']} in the queue)"
    advice = job.get("advice") or (outcome or {}).get("advice")
    if advice and (
        job.get("state") == "interrupted" or (outcome and outcome.get("kind") not in ("succeeded", "already_current"))
    ):
        text += f"\n  advice: {human_text(advice)}"
    return text


def _where(job: dict[str, Any]) -> str:
    """'in phase 2', or 'while queued' for a job that never started."""
    if not job.get("started"):
        return "while queued"
    return f"in {phase_text(job.get('phase'))}"


def interrupted_line(job: dict[str, Any]) -> str:
    """The one line for a job the daemon's stop interrupted."""
    return (
        f"the daemon stopped; job {job['id']} was interrupted {_where(job)}: resume it with netota resume {job['id']}"
    )


def _short_outcome(job: dict[str, Any]) -> str:
    """A job's end in a few words, for a device's line on the board."""
    if job.get("state") == "interrupted":
        return f"job {job['id']} interrupted {_where(job)}: resume it with netota resume {job['id']}"
    outcome = job.get("outcome") or {}
    if outcome:
        return f"job {job['id']} {outcome_text(outcome.get('kind', '-'), outcome.get('message') or '', outcome.get('failure'))}"
    return f"job {job['id']} {job.get('state')}"


def _job_exit_code(job: dict[str, Any], strict: bool = False) -> int:
    if job.get("state") == "interrupted":
        return EXIT_UNAVAILABLE
    outcome = job.get("outcome")
    if not outcome:
        return EXIT_UNAVAILABLE
    return exit_code(OutcomeKind(outcome["kind"]), strict=strict)


def _queued_text(position: Any) -> str:
    return f"queued at position {position}" if position else "queued"


# ---------------------------------------------------------------- following jobs


class DaemonStopped(DaemonUnavailable):
    """The daemon said it is shutting down (its ``shutdown`` event) before the job's end was seen."""


async def _final_job(client: Any, job_id: str, seen: dict[str, Any]) -> dict[str, Any]:
    """The ended job as the daemon has it; ``seen`` (its snapshot updated by its outcome event) when
    the daemon went away (or stopped, 503) right after that event. :class:`DaemonUnavailable` when
    the end was not seen."""
    try:
        return dict((await client.request("GET", f"/v1/jobs/{job_id}"))["job"])
    except (DaemonUnavailable, ApiRefused) as e:
        if isinstance(e, ApiRefused) and e.status < 500:
            raise
        if seen.get("id") != job_id or seen.get("state") in (None, *ACTIVE_STATES):
            raise DaemonUnavailable(
                f"the netota daemon at {client.control} went away before job {job_id} ended ({e})"
            ) from None
        return seen


def _ended_unseen(client: Any, job: dict[str, Any], shutdown: bool) -> DaemonUnavailable:
    job_id = job.get("id", "?")
    where = f" (last seen {_where(job)})" if job.get("state") != "queued" else ""
    if shutdown:
        return DaemonStopped(
            f"the daemon stopped before job {job_id} ended{where}: once it is back, resume it with netota resume {job_id}"
        )
    return DaemonUnavailable(f"the netota daemon at {client.control} went away before job {job_id} ended{where}")


def _renderer(client: Any, args: argparse.Namespace) -> ProgressRenderer:
    return ProgressRenderer(
        sys.stderr, colour=colour_wanted(sys.stderr, getattr(args, "no_color", False)), reactor=client.reactor
    )


def board_for(client: Any, args: argparse.Namespace, out: Any) -> DeviceBoard:
    return DeviceBoard(out, colour=colour_wanted(out, getattr(args, "no_color", False)), reactor=client.reactor)


def _show_snapshot(job: dict[str, Any], draw: Callable[[Any], None]) -> None:
    """A running job's state at once (``watch JOB`` started mid-phase): its phase, and its progress
    or the connection attempt it is waiting on (a job's ``waiting``), if it has one. A job just
    started (detect, nothing yet) shows its events as they come."""
    progress = job.get("progress")
    waiting = event_from_json({**job["waiting"], "type": "waiting"}) if isinstance(job.get("waiting"), dict) else None
    if job.get("phase") in (None, Phase.DETECT.value) and not progress and waiting is None:
        return
    try:
        draw(PhaseChanged(Phase(job["phase"]), ""))
        if progress:
            draw(progress_from_json(progress))
        if waiting is not None:
            draw(waiting)
    except (KeyError, ValueError, TypeError):
        return  # a snapshot this client can't read: the events that follow still draw


async def _follow_job(
    client: Any, job_id: str, args: argparse.Namespace, ended: list[dict[str, Any]] | None = None
) -> int:
    """Follow one job to its end, drawing its progress on stderr; the exit code of its outcome (the
    ended job is appended to ``ended``, if given)."""
    events_json = getattr(args, "events_json", False)
    bars = _renderer(client, args) if not args.json else None
    final: dict[str, Any] = {}
    shutdown: list[bool] = []

    def on_event(event_type: str, data: dict[str, Any]) -> bool:
        if events_json:
            print_json(data, lines=True)
        if event_type == "job":
            snapshot = data["snapshot"]
            final.update(snapshot)
            if bars and snapshot.get("state") == "queued":
                sys.stderr.write(_queued_text(snapshot.get("position")) + "\n")
            elif bars and snapshot.get("state") in ("running", "cancelling"):
                _show_snapshot(snapshot, bars.handle)
            return snapshot["state"] not in ACTIVE_STATES
        if event_type == "state":
            final.update(state=data["state"], position=data.get("position"))
            if bars and data["state"] == "queued":
                sys.stderr.write(_queued_text(data.get("position")) + "\n")
            return False
        if event_type in ("phase", "progress", "waiting"):
            if "phase" in data:
                final["phase"] = data["phase"]
            event = event_from_json(data)
            if bars and event is not None:
                bars.handle(event)
        elif event_type == "outcome":
            final.update(state=data["state"], outcome=data.get("outcome"), advice=data.get("advice"))
            if final.get("outcome") and final["outcome"].get("phase"):
                final["phase"] = final["outcome"]["phase"]
            if bars and data.get("outcome"):
                bars.handle(Finished(Outcome.from_json(data["outcome"])))
            return True
        elif event_type == "shutdown":
            shutdown.append(True)
            return True
        return False

    try:
        await client.stream(f"/v1/jobs/{job_id}/events", on_event)
    finally:
        if bars is not None:
            bars.close()
    if final.get("state") in ACTIVE_STATES:
        raise _ended_unseen(client, {"id": job_id, **final}, bool(shutdown))
    job = await _final_job(client, job_id, final)
    if ended is not None:
        ended.append(job)
    if args.json:
        print_json({"job": job}, lines=events_json)
    elif job.get("state") != "interrupted":
        print(outcome_line(job))
    if job.get("state") == "interrupted":
        sys.stderr.write(f"netota: {interrupted_line(job)}\n")
    return _job_exit_code(job, strict=getattr(args, "strict", False))


async def follow_quietly(client: Any, job: dict[str, Any], board: DeviceBoard | None) -> dict[str, Any]:
    """Follow one job of a batch to its end (its progress on ``board``); its final state. Raises
    :class:`DaemonUnavailable` when the daemon goes away before the job's end is known."""
    job_id, device = job["id"], job["device"]
    ended: dict[str, Any] = {}
    last: dict[str, Any] = dict(job)
    shutdown: list[bool] = []

    def on_event(event_type: str, data: dict[str, Any]) -> bool:
        if event_type == "job":
            snapshot = data["snapshot"]
            last.update(snapshot)
            if board is not None and snapshot.get("state") == "queued":
                board.set(device, _queued_text(snapshot.get("position")))
            elif board is not None and snapshot.get("state") in ("running", "cancelling"):
                _show_snapshot(snapshot, lambda event: board.handle(device, event))
            return snapshot["state"] not in ACTIVE_STATES
        if event_type == "state":
            last.update(state=data.get("state"))
            if board is not None and data.get("state") == "queued":
                board.set(device, _queued_text(data.get("position")))
        if event_type in ("phase", "progress", "waiting"):
            if "phase" in data:
                last["phase"] = data["phase"]
            event = event_from_json(data)
            if board is not None and event is not None:
                board.handle(device, event)
        if event_type == "outcome":
            ended.update(data)
            return True
        if event_type == "shutdown":
            shutdown.append(True)
            return True
        return False

    await client.stream(f"/v1/jobs/{job_id}/events", on_event)
    if not ended and last.get("state") in ACTIVE_STATES:
        raise _ended_unseen(client, last, bool(shutdown))
    seen = (
        {**last, "state": ended["state"], "outcome": ended.get("outcome"), "advice": ended.get("advice")}
        if ended
        else {}
    )
    if seen.get("outcome") and seen["outcome"].get("phase"):
        seen["phase"] = seen["outcome"]["phase"]
    final = await _final_job(client, job_id, seen)
    if final["state"] in ACTIVE_STATES:
        raise _ended_unseen(client, final, bool(shutdown))
    if board is not None:
        board.end(device, _short_outcome(final))
    return final


# ---------------------------------------------------------------- commands


async def cmd_devices(client: Any, args: argparse.Namespace) -> int:
    names = getattr(args, "names", None) or []
    probe = getattr(args, "probe", False)
    if names and not probe:
        raise ValueError("naming devices needs --probe (netota devices --probe NAME ...)")
    if probe:
        answer = await client.request("POST", "/v1/devices/probe", {"devices": list(names)} if names else None)
    else:
        answer = await client.request("GET", "/v1/devices")
    devices = answer["devices"]
    if args.json:
        print_json(answer)
        return 0
    rows = []
    notes = []
    for d in devices:
        percent = f"{d['percent']:.1f}%" if d.get("percent") is not None else "-"
        rate = f"{format_bytes(d['rate'])}/s" if d.get("rate") else "-"
        state = d["state"] + (f" #{d['queue_position']}" if d.get("queue_position") else "")
        row = [
            d["name"],
            state,
            phase_text(d.get("phase")),
            percent,
            rate,
            dash(d.get("job")),
            kind_label(d.get("last_outcome")),
            dash(d.get("firmware_version")),
        ]
        if probe:
            result = d.get("probe") or {}
            row.append(dash(result.get("mode")) if result.get("ok") else "?")
            if not result.get("ok"):
                notes.append(f"{d['name']}: probe failed: {result.get('error') or 'no answer'}")
        rows.append(row)
    headers = ["DEVICE", "STATE", "PHASE", "PERCENT", "RATE", "JOB", "LAST OUTCOME", "FIRMWARE"]
    print(table(rows, headers + (["MODE"] if probe else [])))
    for note in notes:
        print(note)
    return 0


def parse_options(pairs: list[str]) -> dict[str, Any]:
    import json

    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--option {pair!r}: use KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


async def cmd_upgrade(client: Any, args: argparse.Namespace) -> int:
    if args.all:
        if len(args.targets) != 1:
            raise ValueError("with --all, give only FIRMWARE")
        devices = [d["name"] for d in (await client.request("GET", "/v1/devices"))["devices"]]
        if not devices:
            raise ValueError("the daemon has no devices configured")
    else:
        if len(args.targets) < 2:
            raise ValueError("give DEVICE [DEVICE ...] FIRMWARE, or --all FIRMWARE")
        devices = list(dict.fromkeys(args.targets[:-1]))  # a device named twice gets one job
    also = list(dict.fromkeys(getattr(args, "also", None) or []))
    firmware: str | list[str] = [args.targets[-1], *also] if also else args.targets[-1]
    options = parse_options(args.option)
    if args.junit:
        if not args.wait:
            raise ValueError("--junit needs --wait (the report is written when the jobs end)")
        try:
            check_junit_path(args.junit)
        except JUnitError as e:
            raise ValueError(str(e)) from None
    if len(devices) > 1 or args.all:
        return await _upgrade_many(client, args, devices, firmware, options)
    body: dict[str, Any] = {"device": devices[0], "firmware": firmware}
    if options:
        body["options"] = options
    job = (await client.request("POST", "/v1/jobs", body))["job"]
    if not args.wait:
        if args.json:
            print_json({"job": job})
        else:
            print(outcome_line(job))
        return 0
    if not args.json:
        images = " or ".join(job.get("firmware_set") or [job["firmware"]])
        sys.stderr.write(f"job {job['id']}: upgrading {job['device']} with {images}\n")
    ended: list[dict[str, Any]] = []
    code = await _follow_job(client, job["id"], args, ended)
    if args.junit:
        return _write_junit(args, [case_from_job(j) for j in ended]) or code
    return code


def _write_junit(args: argparse.Namespace, cases: list[CaseResult]) -> int:
    """Write ``--junit``'s report; 0, or EXIT_CANT_CREATE (with one line) when it can't be written."""
    try:
        write_junit(args.junit, "netota upgrade", cases, timestamp=time.time(), classname="netota.upgrade")
    except JUnitError as e:
        sys.stderr.write(f"netota: {e}\n")
        return EXIT_CANT_CREATE
    return 0


async def _upgrade_many(
    client: Any, args: argparse.Namespace, devices: list[str], firmware: str | list[str], options: dict[str, Any]
) -> int:
    """One job per device; with --wait, follow them all and print a summary. The exit code is 0 when
    every device succeeded (or was already current), else that of the first device, in the order
    given, that did not (69 for one whose end was not seen because the daemon went away)."""
    jobs: dict[str, dict[str, Any]] = {}
    refused: dict[str, ApiRefused] = {}
    lost: dict[str, DaemonUnavailable] = {}
    for device in devices:
        body: dict[str, Any] = {"device": device, "firmware": firmware}
        if options:
            body["options"] = options
        try:
            jobs[device] = (await client.request("POST", "/v1/jobs", body))["job"]
        except ApiRefused as e:
            refused[device] = e
            sys.stderr.write(f"netota: {device}: {refusal_text(e)}\n")
    if args.wait and jobs:
        board = None if args.json else board_for(client, args, sys.stderr)

        async def follow(device: str) -> None:
            try:
                jobs[device] = await follow_quietly(client, jobs[device], board)
            except DaemonUnavailable as e:
                lost[device] = e
            except ApiRefused as e:  # e.g. 503 from a daemon that stopped between two requests
                lost[device] = DaemonUnavailable(e.message)

        # Each follower catches its own loss, so one broken stream never hides the others' ends
        # (anything else is a bug, reported as one).
        try:
            await gatherResults([Deferred.fromCoroutine(follow(d)) for d in list(jobs)], consumeErrors=True)
        finally:
            if board is not None:
                board.close()
        for device, error in lost.items():
            sys.stderr.write(f"netota: {device}: {error}\n")
    codes: dict[str, int] = {}
    rows = []
    for device in devices:
        if device in refused:
            refusal = refused[device]
            codes[device] = refusal.exit_code
            rows.append([device, "-", "refused", "-", refusal.message])
            continue
        job = jobs[device]
        if device in lost:
            codes[device] = EXIT_UNAVAILABLE
            rows.append([device, job["id"], "unknown", "-", "the daemon went away before the job ended"])
            continue
        if args.wait:
            codes[device] = _job_exit_code(job, strict=args.strict)
        outcome = job.get("outcome") or {}
        if job.get("state") == "interrupted":
            message = f"interrupted {_where(job)}: netota resume {job['id']}"
        else:
            message = human_text(outcome.get("message") or "") or (
                f"position {job['position']}" if job.get("position") else ""
            )
        rows.append([device, job["id"], job["state"], kind_label(outcome.get("kind")), message])
    if args.json:
        print_json(
            {
                "jobs": [jobs[d] for d in devices if d in jobs and d not in lost],
                "refused": {d: {"status": e.status, "code": e.code, "message": e.message} for d, e in refused.items()},
                "lost": {d: {"job": jobs[d]["id"], "message": str(e)} for d, e in lost.items()},
            }
        )
    else:
        print(table(rows, ["DEVICE", "JOB", "STATE", "OUTCOME", "MESSAGE"]))
    interrupted = [jobs[d] for d in devices if d in jobs and d not in lost and jobs[d].get("state") == "interrupted"]
    for job in interrupted:
        sys.stderr.write(f"netota: {interrupted_line(job)}\n")
    code = next((codes[d] for d in devices if codes.get(d, 0) != 0), 0)
    if getattr(args, "junit", None):
        cases = []
        for device in devices:
            if device in refused:
                refusal = refused[device]
                cases.append(CaseResult(device, "failed", kind="refused", message=refusal.message, reason=refusal.code))
            elif device in lost:
                cases.append(
                    CaseResult(device, "failed", kind="unknown", message=str(lost[device]), job=jobs[device]["id"])
                )
            else:
                cases.append(case_from_job(jobs[device]))
        return _write_junit(args, cases) or code
    return code


def page_query(**fields: Any) -> str:
    """A list request's query (``?device=a+b&limit=5``): the fields given, encoded; "" for none."""
    given = {name: value for name, value in fields.items() if value is not None}
    return "?" + urllib.parse.urlencode(given) if given else ""


def older_hint(what: str, command: str, args: argparse.Namespace, next_cursor: Any, **options: Any) -> str | None:
    """The line after a page of a list that has older entries: the command that shows the next page
    (the same ``options``, the ``--control`` given unless it is the one the next command gets
    anyway, and ``--cursor``), each word quoted for a shell and an option's value attached to it
    (``--device=-x``: a value may start with a dash); None on the last page. Never the token."""
    if not next_cursor:
        return None
    given = {**options, "cursor": next_cursor}
    if args.control != os.environ.get("NETOTA_CONTROL", DEFAULT_CONTROL):
        given = {"control": args.control, **given}
    words = [command] + [
        shlex.quote(f"--{name.replace('_', '-')}={value}") for name, value in given.items() if value is not None
    ]
    return f"older {what}: {' '.join(words)}"


async def cmd_jobs(client: Any, args: argparse.Namespace) -> int:
    # --limit 0 too is sent: the daemon refuses it, rather than listing everything
    query = page_query(device=args.device, limit=args.limit, cursor=args.cursor)
    answer = await client.request("GET", "/v1/jobs" + query)
    if args.json:
        print_json(answer)
        return 0
    now = time.time()
    rows = []
    for j in answer["jobs"]:
        outcome = (j.get("outcome") or {}).get("kind")
        if j.get("state") == "interrupted":
            outcome = "interrupted"
        progress = j.get("progress") or {}
        percent = f"{progress['percent']:.1f}%" if progress.get("percent") is not None else "-"
        rows.append(
            [
                j["id"],
                format_short_time(j.get("created"), now),
                j["device"],
                j["firmware"],
                j["state"] + (f" #{j['position']}" if j.get("position") else ""),
                phase_text(j.get("phase")),
                percent,
                kind_label(outcome),
                yes_no(j.get("resumable")),
            ]
        )
    headers = ["JOB", "CREATED", "DEVICE", "FIRMWARE", "STATE", "PHASE", "PERCENT", "OUTCOME", "RESUMABLE"]
    print(table(rows, headers))
    hint = older_hint("jobs", "netota jobs", args, answer.get("next_cursor"), device=args.device, limit=args.limit)
    if hint:
        print(hint)
    return 0


def show_lines(job: dict[str, Any]) -> list[str]:
    """``netota show``: the job's line, its fields with human times and durations, its history."""
    lines = outcome_line(job).splitlines()
    created, started, finished = job.get("created"), job.get("started"), job.get("finished")
    outcome = job.get("outcome") or {}
    fields: list[tuple[str, str]] = [
        ("firmware", dash(job.get("firmware"))),
        ("state", dash(job.get("state"))),
        ("phase", phase_text(job.get("phase"))),
        ("point of no return", yes_no(job.get("point_of_no_return"))),
    ]
    before, after = outcome.get("firmware_version_before"), outcome.get("firmware_version_after")
    if before or after:
        fields.append(("versions", f"{before or '?'} -> {after or '?'}"))
    fields.append(("created", format_time(created)))
    if started is not None:
        waited = f" (queued {format_elapsed(started - created)})" if created is not None else ""
        fields.append(("started", format_time(started) + waited))
    if finished is not None:
        took = f" (took {format_elapsed(finished - (started or created))})" if (started or created) else ""
        fields.append(("finished", format_time(finished) + took))
    elif started is not None and job.get("state") in ACTIVE_STATES:
        fields.append(("running for", format_elapsed(time.time() - started)))
    fields += [
        ("resumable", yes_no(job.get("resumable"))),
        ("resumed from", dash(job.get("resumed_from"))),
        ("resumed by", dash(job.get("resumed_by"))),
    ]
    width = max(len(name) for name, _ in fields)
    lines += [f"  {name.ljust(width)}  {value}" for name, value in fields]
    history = job.get("history") or []
    if history:
        lines.append("  history:")
        start = history[0].get("time") or 0.0
        rows = [
            [
                format_time(entry.get("time")),
                "+" + format_elapsed((entry.get("time") or start) - start),
                dash(entry.get("state")),
                phase_text(entry.get("phase")),
                human_text(entry.get("note") or ""),
            ]
            for entry in history
        ]
        lines += ["    " + line for line in table(rows, ["TIME", "AFTER", "STATE", "PHASE", "NOTE"]).splitlines()]
    return lines


async def cmd_show(client: Any, args: argparse.Namespace) -> int:
    answer = await client.request("GET", f"/v1/jobs/{args.job}")
    if args.json:
        print_json(answer)
        return 0
    for line in show_lines(answer["job"]):
        print(line)
    return 0


async def cmd_watch(client: Any, args: argparse.Namespace) -> int:
    if args.job:
        args.events_json = args.json  # with --json: each event as a JSON line, then the final job
        return await _follow_job(client, args.job, args)
    board = board_for(client, args, sys.stdout)

    def on_event(event_type: str, data: dict[str, Any]) -> bool:
        if args.json:
            print_json(data, lines=True)
            return event_type == "shutdown"
        device = data.get("device", "")
        if event_type == "snapshot":
            if board.interactive:  # a line per device from the start: the rack at a glance
                for d in data.get("devices", []):
                    board.set(
                        d["name"],
                        f"{d['state']}  last: {kind_label(d.get('last_outcome'))}  "
                        f"firmware {dash(d.get('firmware_version'))}",
                    )
            for job in data.get("jobs", []):
                if job.get("state") == "queued":
                    board.set(job["device"], f"job {job['id']} {_queued_text(job.get('position'))}")
                else:
                    _show_snapshot(job, partial(board.handle, job["device"], label=f"{job['device']} {job['id']}"))
        elif event_type in ("phase", "progress", "waiting"):
            event = event_from_json(data)
            if event is not None:
                board.handle(device, event, label=f"{device} {data.get('job')}")
        elif event_type == "state":
            text = f"job {data.get('job')} " + (
                _queued_text(data.get("position")) if data.get("state") == "queued" else str(data.get("state"))
            )
            board.set(device, text)
        elif event_type == "outcome":
            board.end(device, _short_outcome({"id": data.get("job"), **data}))
        elif event_type == "shutdown":
            board.message("the daemon stopped")
            return True
        return False

    try:
        await client.stream("/v1/events", on_event)
    finally:
        board.close()
    raise DaemonUnavailable(f"the netota daemon at {client.control} ended the event stream (it stopped or went away)")


async def cmd_cancel(client: Any, args: argparse.Namespace) -> int:
    body = {"reason": args.reason} if args.reason else {}
    answer = await client.request("POST", f"/v1/jobs/{args.job}/cancel", body)
    if args.json:
        print_json(answer)
    else:
        print(outcome_line(answer["job"]))
    return 0


async def cmd_resume(client: Any, args: argparse.Namespace) -> int:
    body = {"force": True} if args.force else {}
    job = (await client.request("POST", f"/v1/jobs/{args.job}/resume", body))["job"]
    if not args.wait:
        if args.json:
            print_json({"job": job})
        else:
            print(f"job {args.job} resumed as job {job['id']}")
            print(outcome_line(job))
        return 0
    if not args.json:
        sys.stderr.write(f"job {args.job} resumed as job {job['id']}\n")
    return await _follow_job(client, job["id"], args)


EPILOG = """\
The control address is --control, else $NETOTA_CONTROL, else unix:/run/netota/control.sock
(the daemon's own endpoint string works: unix:PATH[:mode=...], tcp:PORT:interface=HOST, or
http://HOST:PORT). A bearer token comes from --token or $NETOTA_TOKEN.

--json prints the API's own answer: {"devices": [...]}, {"jobs": [...], "next_cursor": ...} or
{"job": {...}}
(watch: the API's events as JSON lines, then {"job": {...}} for watch JOB).

Exit codes: 0 succeeded (or already current), 1 failed, 2 unverified, 3 already current with
--strict, 4 aborted, 64 bad request (400/401/403/404) or an image of the other kind, 69 the
daemon can't be reached, went away or stopped before the job ended (the job is then interrupted:
resume it), 70 an internal error of the client, 73 the --junit report could not be written (the
outcome was printed), 75 busy / not cancellable / not resumable (409),
130 the client was interrupted (Ctrl-C; a job keeps running in the daemon), 141 the reader of
the output went away (| head).
"""


def add_parser(subparsers: Any) -> None:
    def sub(name: str, help_text: str, command: Command, draws: bool = False) -> argparse.ArgumentParser:
        return add_client_command(subparsers, name, help_text, command, EPILOG, draws)

    p = sub("devices", "List the daemon's devices and what each is doing.", cmd_devices)
    p.add_argument(
        "--probe",
        action="store_true",
        help="first read each idle device's description document (HTTP only) for its firmware "
        "version and mode (main, loader, double_backup); devices with a job are not contacted",
    )
    p.add_argument("names", nargs="*", metavar="DEVICE", help="with --probe: only these devices (default: all)")

    p = sub(
        "upgrade",
        "Start an upgrade of DEVICE (or several, or --all) with FIRMWARE, a file name in the daemon's firmware_dir.",
        cmd_upgrade,
        draws=True,
    )
    p.usage = (
        "netota upgrade [options] DEVICE [DEVICE ...] FIRMWARE [--also FIRMWARE]\n"
        "       netota upgrade [options] --all FIRMWARE [--also FIRMWARE]"
    )
    p.add_argument(
        "targets", nargs="+", metavar="DEVICE|FIRMWARE", help="the device name(s), then the firmware file name"
    )
    p.add_argument("--all", action="store_true", help="one job for every configured device (then give only FIRMWARE)")
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the job(s) to the end: a progress bar per phase (one line per device for several), "
        "and a summary table for several devices",
    )
    p.add_argument("--strict", action="store_true", help="exit 3 when the device already runs this firmware")
    p.add_argument(
        "--junit",
        metavar="FILE",
        help="with --wait: write a JUnit XML report, one test case per device (for a CI system)",
    )
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="override one engine timeout for this job (e.g. deadline=600); repeatable",
    )
    p.add_argument(
        "--also",
        action="append",
        metavar="FIRMWARE",
        help="an image of the other kind: each device is sent the one for its build (single or double "
        "backup), so one command upgrades a rack of both kinds; repeatable",
    )

    p = sub("jobs", "List jobs, newest first: the latest page, then older ones with --cursor.", cmd_jobs)
    p.add_argument("--device", help="only this device's jobs")
    p.add_argument("--limit", type=int, help="at most this many (1 to 500; default: the daemon's page, 100)")
    p.add_argument(
        "--cursor",
        help="the page after the one that printed it (its last line: older jobs: ... --cursor C)",
    )

    p = sub("show", "Show one job, with its times and its history.", cmd_show)
    p.add_argument("job", metavar="JOB")

    p = sub(
        "watch",
        "Follow one job to its end, or (without JOB) every job, one line per device, until interrupted.",
        cmd_watch,
        draws=True,
    )
    p.add_argument("job", nargs="?", metavar="JOB")
    p.add_argument("--strict", action="store_true", help="exit 3 when the device already ran this firmware")

    p = sub("cancel", "Cancel a queued or running job (STOP is sent to the device).", cmd_cancel)
    p.add_argument("job", metavar="JOB")
    p.add_argument("--reason", help="recorded with the job")

    p = sub(
        "resume",
        "Resume an interrupted, failed or aborted job as a new job for the same device and firmware.",
        cmd_resume,
        draws=True,
    )
    p.add_argument("job", metavar="JOB")
    p.add_argument("--wait", action="store_true", help="follow the new job to its end")
    p.add_argument("--strict", action="store_true", help="exit 3 when the device already runs this firmware")
    p.add_argument(
        "--force",
        action="store_true",
        help="resume even though a later job already upgraded the device (the daemon refuses otherwise)",
    )
