"""``netota devices|upgrade|jobs|show|watch|cancel|resume``: the daemon's command-line client.

The commands: their arguments, the requests each makes, what each prints and its exit code. The
talking to the daemon is :mod:`netota_daemon.cli.control_client` (HTTP+JSON to the control API,
``--control`` or ``$NETOTA_CONTROL``; a UNIX socket by default); a followed job's server-sent events
are drawn as a progress bar per phase by :mod:`netota_daemon.cli.progress` (one per device,
:class:`~netota_daemon.cli.progress.DeviceBoard`, when it follows several). Exit codes: the
outcome's (see ``netota flash``) for a waited job; 64 for a request the daemon refused as bad
(400/403/404); 75 when the device is busy or the job can't be cancelled or resumed (409); 69 when
the daemon can't be reached or goes away before the job ends; 70 for an internal error of the client.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults

from netota_daemon.cli.control_client import ApiRefused, ControlClient, DaemonUnavailable, event_from_json
from netota_daemon.cli.progress import DeviceBoard, ProgressRenderer, format_bytes
from netota_daemon.engine.events import Finished
from netota_daemon.engine.outcome import EXIT_UNAVAILABLE, EXIT_USAGE, Outcome, OutcomeKind, exit_code

DEFAULT_CONTROL = "unix:/run/netota/control.sock"
EXIT_SOFTWARE = 70  # EX_SOFTWARE: an internal error of the client
EXIT_INTERRUPTED = 130  # the client was interrupted (Ctrl-C); the daemon's job is not affected


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = (
        [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=False)]
        if rows
        else [len(h) for h in headers]
    )
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=False)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
    return "\n".join(lines)


def _dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _outcome_line(job: dict[str, Any]) -> str:
    outcome = job.get("outcome")
    if job.get("state") == "interrupted":
        text = f"job {job['id']} on {job['device']}: interrupted in {job.get('phase')}"
    elif outcome:
        text = f"job {job['id']} on {job['device']}: {outcome['kind']}: {outcome.get('message', '')}"
        if outcome.get("firmware_version_after") and outcome["firmware_version_after"] not in text:
            text += f" (firmware {outcome['firmware_version_after']})"
    else:
        text = f"job {job['id']} on {job['device']}: {job['state']}"
        if job.get("position"):
            text += f" (position {job['position']} in the queue)"
    advice = job.get("advice") or (outcome or {}).get("advice")
    if advice and (
        job.get("state") == "interrupted" or (outcome and outcome.get("kind") not in ("succeeded", "already_current"))
    ):
        text += f"\n  advice: {advice}"
    return text


def _job_exit_code(job: dict[str, Any], strict: bool = False) -> int:
    if job.get("state") == "interrupted":
        return EXIT_UNAVAILABLE
    outcome = job.get("outcome")
    if not outcome:
        return EXIT_UNAVAILABLE
    return exit_code(OutcomeKind(outcome["kind"]), strict=strict)


# ---------------------------------------------------------------- commands


async def _final_job(client: ControlClient, job_id: str, seen: dict[str, Any]) -> dict[str, Any]:
    """The ended job as the daemon has it; ``seen`` (its snapshot updated by its outcome event) when
    the daemon went away (or stopped, 503) right after that event. :class:`DaemonUnavailable` when
    the end was not seen."""
    try:
        return (await client.request("GET", f"/v1/jobs/{job_id}"))["job"]
    except (DaemonUnavailable, ApiRefused) as e:
        if isinstance(e, ApiRefused) and e.status < 500:
            raise
        if seen.get("id") != job_id or seen.get("state") in (None, "queued", "running", "cancelling"):
            raise DaemonUnavailable(
                f"the netota daemon at {client.control} went away before job {job_id} ended ({e})"
            ) from None
        return seen


async def _follow_job(client: ControlClient, job_id: str, args: argparse.Namespace) -> int:
    """Follow one job to its end, drawing its progress on stderr; the exit code of its outcome."""
    bars = ProgressRenderer(sys.stderr) if not args.json else None
    final: dict[str, Any] = {}

    def on_event(event_type: str, data: dict[str, Any]) -> bool:
        if getattr(args, "events_json", False):
            print(json.dumps(data, sort_keys=True), flush=True)
        if event_type == "job":
            snapshot = data["snapshot"]
            final.update(snapshot)
            if bars and snapshot.get("state") == "queued":
                sys.stderr.write(f"queued at position {snapshot.get('position')}\n")
            return snapshot["state"] not in ("queued", "running", "cancelling")
        if event_type == "state":
            final.update(state=data["state"], position=data.get("position"))
            if bars and data["state"] == "queued":
                sys.stderr.write(f"queued at position {data.get('position')}\n")
            return False
        if event_type in ("phase", "progress") and bars:
            event = event_from_json(data)
            if event is not None:
                bars.handle(event)
        elif event_type == "outcome":
            final.update(state=data["state"], outcome=data.get("outcome"), advice=data.get("advice"))
            if bars and data.get("outcome"):
                bars.handle(Finished(Outcome.from_json(data["outcome"])))
            return True
        elif event_type == "shutdown":
            return True
        return False

    try:
        await client.stream(f"/v1/jobs/{job_id}/events", on_event)
    finally:
        if bars is not None and bars.interactive and not final.get("outcome"):
            sys.stderr.write("\n")  # end a progress line the stream left open
    if final.get("state") in ("queued", "running", "cancelling"):
        raise DaemonUnavailable(f"the netota daemon at {client.control} went away before job {job_id} ended")
    job = await _final_job(client, job_id, final)
    if args.json:
        _print_json(job)
    else:
        print(_outcome_line(job))
    return _job_exit_code(job, strict=getattr(args, "strict", False))


async def cmd_devices(client: ControlClient, args: argparse.Namespace) -> int:
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
        _print_json(answer if probe else devices)
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
            _dash(d.get("phase")),
            percent,
            rate,
            _dash(d.get("job")),
            _dash(d.get("last_outcome")),
            _dash(d.get("firmware_version")),
        ]
        if probe:
            result = d.get("probe") or {}
            row.append(_dash(result.get("mode")) if result.get("ok") else "?")
            if not result.get("ok"):
                notes.append(f"{d['name']}: probe failed: {result.get('error') or 'no answer'}")
        rows.append(row)
    headers = ["DEVICE", "STATE", "PHASE", "PERCENT", "RATE", "JOB", "LAST OUTCOME", "FIRMWARE"]
    print(_table(rows, headers + (["MODE"] if probe else [])))
    for note in notes:
        print(note)
    return 0


def _parse_options(pairs: list[str]) -> dict[str, Any]:
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


async def cmd_upgrade(client: ControlClient, args: argparse.Namespace) -> int:
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
    firmware = args.targets[-1]
    options = _parse_options(args.option)
    if len(devices) > 1 or args.all:
        return await _upgrade_many(client, args, devices, firmware, options)
    body: dict[str, Any] = {"device": devices[0], "firmware": firmware}
    if options:
        body["options"] = options
    job = (await client.request("POST", "/v1/jobs", body))["job"]
    if not args.wait:
        if args.json:
            _print_json(job)
        else:
            print(_outcome_line(job))
        return 0
    if not args.json:
        sys.stderr.write(f"job {job['id']}: upgrading {job['device']} with {job['firmware']}\n")
    return await _follow_job(client, job["id"], args)


def _short_outcome(job: dict[str, Any]) -> str:
    """A job's end in a few words, for a device's line: ``job 3f2a... succeeded: upgraded ...``."""
    outcome = job.get("outcome") or {}
    text = f"job {job['id']} {job['state']}"
    if outcome:
        text += f": {outcome.get('kind', '-')} {outcome.get('message', '')}".rstrip()
    return text


async def _follow_quietly(client: ControlClient, job: dict[str, Any], board: DeviceBoard | None) -> dict[str, Any]:
    """Follow one job of a batch to its end (its progress on ``board``); its final state. Raises
    :class:`DaemonUnavailable` when the daemon goes away before the job's end is known."""
    job_id, device = job["id"], job["device"]
    ended: dict[str, Any] = {}

    def on_event(event_type: str, data: dict[str, Any]) -> bool:
        if event_type == "job":
            snapshot = data["snapshot"]
            if board is not None and snapshot.get("state") == "queued":
                board.set(device, f"queued at position {snapshot.get('position')}")
            return snapshot["state"] not in ("queued", "running", "cancelling")
        if event_type == "state" and board is not None and data.get("state") == "queued":
            board.set(device, f"queued at position {data.get('position')}")
        if event_type in ("phase", "progress") and board is not None:
            event = event_from_json(data)
            if event is not None:
                board.handle(device, event)
        if event_type == "outcome":
            ended.update(data)
            return True
        return event_type == "shutdown"

    await client.stream(f"/v1/jobs/{job_id}/events", on_event)
    seen = (
        {**job, "state": ended["state"], "outcome": ended.get("outcome"), "advice": ended.get("advice")}
        if ended
        else {}
    )
    final = await _final_job(client, job_id, seen)
    if final["state"] in ("queued", "running", "cancelling"):
        raise DaemonUnavailable(f"the netota daemon at {client.control} went away before job {job_id} ended")
    if board is not None:
        board.end(device, _short_outcome(final))
    return final


async def _upgrade_many(
    client: ControlClient, args: argparse.Namespace, devices: list[str], firmware: str, options: dict[str, Any]
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
            sys.stderr.write(f"netota: {device}: refused ({e.status} {e.code}): {e.message}\n")
    if args.wait and jobs:
        board = None if args.json else DeviceBoard(sys.stderr)

        async def follow(device: str) -> None:
            try:
                jobs[device] = await _follow_quietly(client, jobs[device], board)
            except DaemonUnavailable as e:
                lost[device] = e
            except ApiRefused as e:  # e.g. 503 from a daemon that stopped between two requests
                lost[device] = DaemonUnavailable(f"refused ({e.status} {e.code}): {e.message}")

        # Each follower catches its own loss, so one broken stream never hides the others' ends
        # (anything else is a bug, reported as one).
        await gatherResults([Deferred.fromCoroutine(follow(d)) for d in list(jobs)], consumeErrors=True)
        for device, error in lost.items():
            sys.stderr.write(f"netota: {device}: {error}\n")
    codes: dict[str, int] = {}
    rows = []
    for device in devices:
        if device in refused:
            error = refused[device]
            codes[device] = error.exit_code
            rows.append([device, "-", "refused", error.code, error.message])
            continue
        job = jobs[device]
        if device in lost:
            codes[device] = EXIT_UNAVAILABLE
            rows.append([device, job["id"], "unknown", "-", "the daemon went away before the job ended"])
            continue
        if args.wait:
            codes[device] = _job_exit_code(job, strict=args.strict)
        outcome = job.get("outcome") or {}
        rows.append(
            [
                device,
                job["id"],
                job["state"],
                outcome.get("kind", "-"),
                outcome.get("message") or (f"position {job['position']}" if job.get("position") else ""),
            ]
        )
    if args.json:
        _print_json(
            {
                "jobs": [jobs[d] for d in devices if d in jobs and d not in lost],
                "refused": {d: {"status": e.status, "code": e.code, "message": e.message} for d, e in refused.items()},
                "lost": {d: {"job": jobs[d]["id"], "message": str(e)} for d, e in lost.items()},
            }
        )
    else:
        print(_table(rows, ["DEVICE", "JOB", "STATE", "OUTCOME", "MESSAGE"]))
    return next((codes[d] for d in devices if codes.get(d, 0) != 0), 0)


async def cmd_jobs(client: ControlClient, args: argparse.Namespace) -> int:
    query = []
    if args.device:
        query.append(f"device={args.device}")
    if args.limit is not None:  # 0 too: the daemon refuses it, rather than listing everything
        query.append(f"limit={args.limit}")
    jobs = (await client.request("GET", "/v1/jobs" + ("?" + "&".join(query) if query else "")))["jobs"]
    if args.json:
        _print_json(jobs)
        return 0
    rows = []
    for j in jobs:
        outcome = (j.get("outcome") or {}).get("kind")
        progress = j.get("progress") or {}
        percent = f"{progress['percent']:.1f}%" if progress.get("percent") is not None else "-"
        rows.append(
            [
                j["id"],
                j["device"],
                j["firmware"],
                j["state"] + (f" #{j['position']}" if j.get("position") else ""),
                j["phase"],
                percent,
                _dash(outcome),
                "yes" if j.get("resumable") else "-",
            ]
        )
    print(_table(rows, ["JOB", "DEVICE", "FIRMWARE", "STATE", "PHASE", "PERCENT", "OUTCOME", "RESUMABLE"]))
    return 0


async def cmd_show(client: ControlClient, args: argparse.Namespace) -> int:
    job = (await client.request("GET", f"/v1/jobs/{args.job}"))["job"]
    if args.json:
        _print_json(job)
        return 0
    print(_outcome_line(job))
    for key in ("firmware", "state", "phase", "point_of_no_return", "resumable", "resumed_from", "resumed_by"):
        print(f"  {key}: {_dash(job.get(key))}")
    for entry in job.get("history", []):
        print(f"  - {entry['time']:.3f} {entry['state']} {entry['phase']} {entry['note']}")
    return 0


async def cmd_watch(client: ControlClient, args: argparse.Namespace) -> int:
    if args.job:
        args.events_json = args.json  # with --json: each event as a JSON line, then the final job
        return await _follow_job(client, args.job, args)
    board = DeviceBoard(sys.stdout)

    def on_event(event_type: str, data: dict[str, Any]) -> bool:
        if args.json:
            print(json.dumps(data, sort_keys=True), flush=True)
            return event_type == "shutdown"
        device = data.get("device", "")
        if event_type == "snapshot":
            if board.interactive:  # a line per device from the start: the rack at a glance
                for d in data.get("devices", []):
                    board.set(
                        d["name"],
                        f"{d['state']}  last: {_dash(d.get('last_outcome'))}  "
                        f"firmware {_dash(d.get('firmware_version'))}",
                    )
            for job in data.get("jobs", []):
                board.set(
                    job["device"],
                    f"job {job['id']} {job['state']}" + (f" #{job['position']}" if job.get("position") else ""),
                )
        elif event_type in ("phase", "progress"):
            event = event_from_json(data)
            if event is not None:
                board.handle(device, event, label=f"{device} {data['job']}")
        elif event_type == "state":
            board.set(
                device, f"job {data['job']} {data['state']}" + (f" #{data['position']}" if data.get("position") else "")
            )
        elif event_type == "outcome":
            board.end(device, _short_outcome({"id": data["job"], **data}))
        elif event_type == "shutdown":
            board.message(data.get("message") or "the daemon is shutting down")
            return True
        return False

    await client.stream("/v1/events", on_event)
    raise DaemonUnavailable(
        f"the netota daemon at {client.control} ended the event stream (it is shutting down or went away)"
    )


async def cmd_cancel(client: ControlClient, args: argparse.Namespace) -> int:
    body = {"reason": args.reason} if args.reason else {}
    job = (await client.request("POST", f"/v1/jobs/{args.job}/cancel", body))["job"]
    if args.json:
        _print_json(job)
    else:
        print(_outcome_line(job))
    return 0


async def cmd_resume(client: ControlClient, args: argparse.Namespace) -> int:
    job = (await client.request("POST", f"/v1/jobs/{args.job}/resume", {}))["job"]
    if not args.wait:
        if args.json:
            _print_json(job)
        else:
            print(f"job {args.job} resumed as job {job['id']}")
            print(_outcome_line(job))
        return 0
    if not args.json:
        sys.stderr.write(f"job {args.job} resumed as job {job['id']}\n")
    return await _follow_job(client, job["id"], args)


def _run(command: Callable[[ControlClient, argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    def func(args: argparse.Namespace) -> int:
        from twisted.internet import task

        codes: list[int] = []
        stopping: list[bool] = []

        async def main(reactor: Any) -> None:
            reactor.addSystemEventTrigger("before", "shutdown", stopping.append, True)
            try:
                client = ControlClient(reactor, args.control, args.token)
            except ValueError as e:
                sys.stderr.write(f"netota: {e}\n")
                codes.append(EXIT_USAGE)
                return
            try:
                codes.append(await command(client, args))
            except DaemonUnavailable as e:
                if stopping:
                    return  # our own shutdown (Ctrl-C) closed the connection, not the daemon
                sys.stderr.write(f"netota: {e}\n")
                codes.append(EXIT_UNAVAILABLE)
            except ApiRefused as e:
                sys.stderr.write(f"netota: refused ({e.status} {e.code}): {e.message}\n")
                codes.append(e.exit_code)
            except ValueError as e:
                sys.stderr.write(f"netota: {e}\n")
                codes.append(EXIT_USAGE)
            except Exception:  # a bug, or an answer this client does not understand: never "interrupted"
                import traceback

                sys.stderr.write(f"netota: internal error:\n{traceback.format_exc()}")
                codes.append(EXIT_SOFTWARE)

        try:
            task.react(lambda reactor: ensureDeferred(main(reactor)))
        except SystemExit:
            pass
        if not codes:
            # Ctrl-C (or SIGTERM) stopped the reactor before the command finished: a job being
            # watched carries on in the daemon.
            sys.stderr.write(
                "netota: interrupted; any job started keeps running in the daemon (netota jobs, netota watch JOB)\n"
            )
            return EXIT_INTERRUPTED
        return codes[0]

    return func


EPILOG = """\
The control address is --control, else $NETOTA_CONTROL, else unix:/run/netota/control.sock
(the daemon's own endpoint string works: unix:PATH[:mode=...], tcp:PORT:interface=HOST, or
http://HOST:PORT). A bearer token comes from --token or $NETOTA_TOKEN.

Exit codes: 0 succeeded (or already current), 1 failed, 2 unverified, 3 already current with
--strict, 4 aborted, 5 not applicable (double backup), 64 bad request (400/401/403/404), 69 the
daemon can't be reached or went away before the job ended (or the job was interrupted by its
shutdown), 70 an internal error of the client, 75 busy / not cancellable / not resumable (409),
130 the client was interrupted (Ctrl-C; a job keeps running in the daemon).
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control",
        default=os.environ.get("NETOTA_CONTROL", DEFAULT_CONTROL),
        help="the daemon's control address (default: $NETOTA_CONTROL or %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("NETOTA_TOKEN"),
        help="bearer token for a daemon that requires one (default: $NETOTA_TOKEN)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def add_parser(subparsers: Any) -> None:
    def sub(name: str, help_text: str, command: Callable[..., Any]) -> argparse.ArgumentParser:
        p = subparsers.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common(p)
        p.set_defaults(func=_run(command))
        return p

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
    )
    p.usage = "netota upgrade [options] DEVICE [DEVICE ...] FIRMWARE\n       netota upgrade [options] --all FIRMWARE"
    p.add_argument(
        "targets", nargs="+", metavar="DEVICE|FIRMWARE", help="the device name(s), then the firmware file name"
    )
    p.add_argument("--all", action="store_true", help="one job for every configured device (then give only FIRMWARE)")
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the job(s) to the end: a progress bar per phase (one per device for several), "
        "and a summary table for several devices",
    )
    p.add_argument("--strict", action="store_true", help="exit 3 when the device already runs this firmware")
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="override one engine timeout for this job (e.g. deadline=600); repeatable",
    )

    p = sub("jobs", "List jobs, newest first.", cmd_jobs)
    p.add_argument("--device", help="only this device's jobs")
    p.add_argument("--limit", type=int, help="at most this many")

    p = sub("show", "Show one job, with its history.", cmd_show)
    p.add_argument("job", metavar="JOB")

    p = sub(
        "watch",
        "Follow one job to its end, or (without JOB) every job, one progress bar per device, until interrupted.",
        cmd_watch,
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
    )
    p.add_argument("job", metavar="JOB")
    p.add_argument("--wait", action="store_true", help="follow the new job to its end")
    p.add_argument("--strict", action="store_true", help="exit 3 when the device already runs this firmware")
