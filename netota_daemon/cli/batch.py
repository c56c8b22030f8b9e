"""``netota batch start|show|watch|cancel``, ``netota batches`` and ``netota rescue``: rollouts and
rescues through the daemon's control API (``/v1/batches``, ``/v1/rescue``).

``batch start ... --wait`` (and ``batch watch ID``) follow the batch's own event stream: one line per
device, live (its state, its job's progress, how it ended), then a table of every member. The exit
status is 0 when every member succeeded or was skipped as already current; otherwise that of the
first member, in the batch's order, that did not: its job's outcome code (1 failed, 2 unverified,
4 aborted, 64 an image of the other kind), 1 for a device refused at pre-flight or skipped after a
failure (canary, threshold, changed image), 4 for one skipped because the batch was cancelled; 69
when the daemon went away before the batch ended. ``--junit FILE`` writes the JUnit report
(:mod:`netota_daemon.cli.junit`), checked for a writable place before anything starts.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from netota_daemon.cli import arguments
from netota_daemon.cli.client import DaemonStopped, board_for, follow_quietly, older_hint, page_query, parse_options
from netota_daemon.cli.control_client import ApiRefused, DaemonUnavailable, event_from_json
from netota_daemon.cli.exit_codes import EXIT_CANT_CREATE, EXIT_UNAVAILABLE, exit_code
from netota_daemon.cli.junit import JUnitError, case_from_member, check_junit_path, write_junit
from netota_daemon.cli.output import print_json
from netota_daemon.cli.runner import add_client_command
from netota_daemon.cli.text import dash, format_elapsed, format_time, kind_label, outcome_text, table
from netota_daemon.engine.outcome import OutcomeKind

EXIT_FAILED = 1
EXIT_CANCELLED = 4
ENDED = ("finished", "cancelled")


# ---------------------------------------------------------------- how a batch is told


def member_text(member: dict[str, Any]) -> str:
    """A member's state in a few words, for its line and the table."""
    state = member.get("state")
    outcome = member.get("outcome") or {}
    job = f"job {member['job']} " if member.get("job") else ""
    if state in ("succeeded", "failed", "cancelled") and outcome:
        return job + outcome_text(outcome.get("kind", state), outcome.get("message") or "", outcome.get("failure"))
    if state in ("skipped", "refused"):
        return f"{state} ({kind_label(member.get('reason'))}): {member.get('message') or ''}".rstrip(": ")
    if state in ("failed", "cancelled") and member.get("message"):  # ended with no outcome (its job lost)
        return f"{job}{state}: {member['message']}"
    if state == "starting":
        return "starting"
    if state == "pending":
        return "pre-flight probe"
    if state == "ready":
        return "waiting for its turn" + (" (canary)" if member.get("canary") else "")
    return job + str(state)


def member_exit_code(member: dict[str, Any]) -> int:
    """0 for a member that ended well, else the code the batch exits with for it."""
    state, reason = member.get("state"), member.get("reason")
    if state == "succeeded" or (state == "skipped" and reason == "already_current"):
        return 0
    if state == "skipped":
        return EXIT_CANCELLED if reason == "cancelled" else EXIT_FAILED
    outcome = member.get("outcome") or {}
    kind = outcome.get("kind")
    if state in ("failed", "cancelled") and kind in {k.value for k in OutcomeKind}:
        return exit_code(OutcomeKind(kind))
    if state == "cancelled":
        return EXIT_CANCELLED
    if state in ("pending", "ready", "starting", "running", "cancelling"):
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


def batch_exit_code(batch: dict[str, Any]) -> int:
    return next((code for m in batch.get("members", []) if (code := member_exit_code(m)) != 0), 0)


def _counts_text(counts: dict[str, Any]) -> str:
    order = ("succeeded", "failed", "cancelled", "skipped", "refused", "running", "starting", "ready", "pending")
    parts = [f"{counts[k]} {k}" for k in order if counts.get(k)]
    return ", ".join(parts) or "no devices"


def summary_line(batch: dict[str, Any]) -> str:
    result = batch.get("result") or batch.get("state")
    text = f"batch {batch['id']} ({batch.get('firmware')}): {kind_label(result)}"
    if batch.get("stop_message") and batch.get("stop_reason"):
        text += f", stopped: {batch['stop_message']}"
    return f"{text} ({_counts_text(batch.get('counts') or {})})"


def member_rows(batch: dict[str, Any]) -> list[list[str]]:
    rows = []
    for member in batch.get("members", []):
        rows.append(
            [
                member["device"],
                "yes" if member.get("canary") else "-",
                member.get("state", "-"),
                dash(member.get("job")),
                format_elapsed(member["duration"]) if member.get("duration") is not None else "-",
                member_text(member),
            ]
        )
    return rows


def show_lines(batch: dict[str, Any]) -> list[str]:
    policy = batch.get("policy") or {}
    image = batch.get("image") or {}
    selection = batch.get("selection") or {}
    chosen = (
        "every device"
        if selection.get("all")
        else f"tag {selection['tag']}"
        if selection.get("tag")
        else ", ".join(selection.get("devices") or [])
    )
    target = batch.get("target") or {}
    lines = [
        summary_line(batch),
        f"  firmware: {batch.get('firmware')} ({kind_label(image.get('kind'))}, sha256 {str(image.get('sha256', ''))[:16]}...)",
        f"  devices: {chosen}",
        "  policy: "
        + ", ".join(
            [
                f"canary {policy.get('canary') or 0}",
                f"max failures {dash(policy.get('max_failures'))}",
                f"pre-flight {'on' if policy.get('preflight', True) else 'off'}",
                f"skip current {'on' if policy.get('skip_current') else 'off'}",
                f"max parallel {batch.get('max_parallel')}",
            ]
        ),
    ]
    if target:
        lines.append(
            f"  target version: {target.get('version')}" + (f" (from job {target['job']})" if target.get("job") else "")
        )
    lines.append(
        f"  created: {format_time(batch.get('created'))}"
        + (f", took {format_elapsed(batch['duration'])}" if batch.get("duration") is not None else "")
    )
    for note in batch.get("notes") or []:
        lines.append(f"  note: {note}")
    if batch.get("journal_error"):
        lines.append(f"  journal error: {batch['journal_error']}")
    lines.append("")
    lines.append(table(member_rows(batch), ["DEVICE", "CANARY", "STATE", "JOB", "TOOK", "OUTCOME"]))
    return lines


# ---------------------------------------------------------------- following a batch


async def follow_batch(client: Any, batch: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Follow ``batch`` to its end on its event stream, a line per device on stderr; the ended
    batch. :class:`DaemonUnavailable` when the daemon goes away first."""
    batch_id = batch["id"]
    board = None if args.json else board_for(client, args, sys.stderr)
    final: dict[str, Any] = dict(batch)
    shutdown: list[bool] = []
    device_of_job: dict[str, str] = {}

    def show(member: dict[str, Any]) -> None:
        if member.get("job"):
            device_of_job[member["job"]] = member["device"]
        if board is None:
            return
        text = member_text(member)
        if member.get("state") in ("succeeded", "failed", "cancelled", "skipped", "refused"):
            board.end(member["device"], text)
        elif member.get("state") != "running":
            board.set(member["device"], text)

    def on_event(event_type: str, data: dict[str, Any]) -> bool:
        if event_type == "snapshot":
            final.update(data["snapshot"])
            for member in final.get("members", []):
                show(member)
            return final.get("state") in ENDED
        if event_type == "member":
            member = data["member"]
            final["members"] = [member if m["device"] == member["device"] else m for m in final.get("members", [])]
            show(member)
        elif event_type == "batch":
            final.update(
                state=data.get("state"), **{k: v for k, v in (data.get("summary") or {}).items() if k != "state"}
            )
        elif event_type in ("phase", "progress", "waiting") and board is not None:
            device = device_of_job.get(str(data.get("job"))) or data.get("device")
            event = event_from_json(data)
            if device and event is not None:
                board.handle(device, event)
        elif event_type == "batch_end":
            final.update(data["snapshot"])
            return True
        elif event_type == "shutdown":
            shutdown.append(True)
            return True
        return False

    lost: DaemonUnavailable | None = None
    try:
        await client.stream(f"/v1/batches/{batch_id}/events", on_event)
    except DaemonUnavailable as e:
        lost = e
    finally:
        if board is not None:
            board.close()
    try:
        return dict((await client.request("GET", f"/v1/batches/{batch_id}"))["batch"])
    except (DaemonUnavailable, ApiRefused) as e:
        if isinstance(e, ApiRefused) and e.status < 500:
            raise
        if final.get("state") in ENDED:
            return final
        if shutdown:
            raise DaemonStopped(
                f"the daemon stopped before batch {batch_id} ended: it carries the batch on when it is back "
                f"(netota batch watch {batch_id})"
            ) from None
        raise DaemonUnavailable(
            f"the netota daemon at {client.control} went away before batch {batch_id} ended ({lost or e}): "
            f"it carries the batch on when it is back (netota batch watch {batch_id})"
        ) from None


def _report(batch: dict[str, Any], args: argparse.Namespace) -> int:
    """The ended batch: JSON, or its summary and table; the JUnit file; the exit code."""
    if args.json:
        print_json({"batch": batch})
    else:
        print(table(member_rows(batch), ["DEVICE", "CANARY", "STATE", "JOB", "TOOK", "OUTCOME"]))
        print(summary_line(batch))
    junit = getattr(args, "junit", None)
    if junit:
        try:
            write_junit(
                junit,
                f"netota batch {batch['id']}",
                [case_from_member(m) for m in batch.get("members", [])],
                timestamp=batch.get("created"),
                classname="netota.batch",
                properties={"batch": batch["id"], "firmware": batch.get("firmware"), "result": batch.get("result")},
            )
        except JUnitError as e:
            sys.stderr.write(f"netota: {e}\n")
            return EXIT_CANT_CREATE
    if batch.get("state") not in ENDED:
        return EXIT_UNAVAILABLE
    return batch_exit_code(batch)


def _check_junit(args: argparse.Namespace) -> None:
    if getattr(args, "junit", None):
        try:
            check_junit_path(args.junit)
        except JUnitError as e:
            raise ValueError(str(e)) from None


# ---------------------------------------------------------------- commands


def start_body(args: argparse.Namespace) -> dict[str, Any]:
    """The ``POST /v1/batches`` body for ``netota batch start``'s arguments."""
    chosen = [bool(args.all), args.tag is not None, bool(args.devices)]
    if sum(chosen) != 1:
        raise ValueError("give the devices: DEVICE ..., --all or --tag TAG (exactly one of them)")
    body: dict[str, Any] = {"firmware": args.firmware}
    if args.all:
        body["all"] = True
    elif args.tag is not None:
        body["tag"] = args.tag
    else:
        body["devices"] = list(dict.fromkeys(args.devices))
    policy: dict[str, Any] = {}
    if args.canary is not None:
        policy["canary"] = args.canary
    if args.max_failures is not None:
        policy["max_failures"] = args.max_failures
    if args.max_parallel is not None:
        policy["max_parallel"] = args.max_parallel
    if args.no_preflight:
        policy["preflight"] = False
    if args.skip_current is not None or args.skip_current_known:
        if args.skip_current is not None and args.skip_current_known:
            raise ValueError("give --skip-current VERSION or --skip-current-known, not both")
        policy["skip_current"] = True
        if args.skip_current is not None:
            if not args.skip_current.strip():
                raise ValueError("--skip-current: the version is empty")
            body["target_version"] = args.skip_current
    if args.no_resume:
        policy["resume_interrupted"] = False
    if policy:
        body["policy"] = policy
    options = parse_options(args.option)
    if options:
        body["options"] = options
    return body


async def cmd_batch_start(client: Any, args: argparse.Namespace) -> int:
    body = start_body(args)
    if getattr(args, "junit", None) and not args.wait:
        raise ValueError("--junit needs --wait (the report is written when the batch ends)")
    _check_junit(args)
    batch = (await client.request("POST", "/v1/batches", body))["batch"]
    if not args.wait:
        if args.json:
            print_json({"batch": batch})
        else:
            print(
                f"batch {batch['id']}: {len(batch.get('members', []))} device(s), firmware {batch.get('firmware')}; "
                f"{batch.get('state')} (follow it: netota batch watch {batch['id']})"
            )
        return 0
    if not args.json:
        sys.stderr.write(
            f"batch {batch['id']}: {len(batch.get('members', []))} device(s) with {batch.get('firmware')}\n"
        )
    return _report(await follow_batch(client, batch, args), args)


async def cmd_batch_watch(client: Any, args: argparse.Namespace) -> int:
    _check_junit(args)
    batch = (await client.request("GET", f"/v1/batches/{args.batch}"))["batch"]
    return _report(await follow_batch(client, batch, args), args)


async def cmd_batch_show(client: Any, args: argparse.Namespace) -> int:
    batch = (await client.request("GET", f"/v1/batches/{args.batch}"))["batch"]
    if args.json:
        print_json({"batch": batch})
    else:
        print("\n".join(show_lines(batch)))
    return 0


async def cmd_batch_cancel(client: Any, args: argparse.Namespace) -> int:
    body = {"reason": args.reason} if args.reason else {}
    batch = (await client.request("POST", f"/v1/batches/{args.batch}/cancel", body))["batch"]
    if args.json:
        print_json({"batch": batch})
    else:
        print(summary_line(batch))
    return 0


async def cmd_batches(client: Any, args: argparse.Namespace) -> int:
    answer = await client.request("GET", "/v1/batches" + page_query(limit=args.limit, cursor=args.cursor))
    if args.json:
        print_json(answer)
        return 0
    rows = []
    for batch in answer["batches"]:
        counts = batch.get("counts") or {}
        rows.append(
            [
                batch["id"],
                format_time(batch.get("created")),
                str(batch.get("firmware")),
                str(counts.get("total", "-")),
                str(batch.get("state")),
                dash(batch.get("result")),
                _counts_text(counts),
            ]
        )
    print(table(rows, ["BATCH", "CREATED", "FIRMWARE", "DEVICES", "STATE", "RESULT", "MEMBERS"]))
    hint = older_hint("batches", "netota batches", args, answer.get("next_cursor"), limit=args.limit)
    if hint:
        print(hint)
    return 0


async def cmd_rescue(client: Any, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.devices:
        body["devices"] = list(dict.fromkeys(args.devices))
    if args.firmware:
        body["firmware"] = args.firmware
    answer = await client.request("POST", "/v1/rescue", body)
    plans = answer["rescues"]
    code = 0
    jobs: dict[str, dict[str, Any]] = {}
    if args.wait and any(p.get("started") for p in plans):
        board = None if args.json else board_for(client, args, sys.stderr)
        try:
            for plan in plans:
                if plan.get("started"):
                    jobs[plan["device"]] = await follow_quietly(
                        client, {"id": plan["started"], "device": plan["device"]}, board
                    )
        finally:
            if board is not None:
                board.close()
    if args.json:
        print_json({"rescues": plans, "jobs": list(jobs.values())} if args.wait else answer)
    for plan in plans:
        if not args.json:
            line = f"{plan['device']}: {plan['message']}"
            if plan.get("started"):
                line += f" (job {plan['started']})"
            print(line)
        if plan.get("action") == "needs_firmware":
            code = code or EXIT_FAILED
        job = jobs.get(plan["device"])
        if job is not None:
            outcome = job.get("outcome") or {}
            if not args.json:
                print(
                    f"  job {job['id']}: {outcome_text(str(outcome.get('kind') or job.get('state')), outcome.get('message') or '')}"
                )
            kind = outcome.get("kind")
            job_code = exit_code(OutcomeKind(kind)) if kind in {k.value for k in OutcomeKind} else EXIT_UNAVAILABLE
            code = code or job_code
    return code


# ---------------------------------------------------------------- arguments

CONTROL_TEXT = """\
The control address is --control, else $NETOTA_CONTROL, else unix:/run/netota/control.sock;
a bearer token comes from --token or $NETOTA_TOKEN.
"""

EPILOG = (
    CONTROL_TEXT
    + """
Exit codes of batch start --wait and batch watch: 0 every device succeeded (or was skipped as
already current); else that of the first device, in the batch's order, that did not: its job's
outcome (1 failed, 2 unverified, 4 aborted, 64 an image of the other kind), 1 refused at pre-flight
or skipped after a failure, 4 skipped because the batch was cancelled. 64 bad arguments or a
request refused as bad, 69 the daemon went away before the batch ended (it carries the batch on
after a restart), 75 busy (a device in another unfinished batch) or not cancellable (409).
"""
)

RESCUE_EPILOG = (
    """\
Each device is probed (its description document only); one found in its phase-2 loader is
finished: the job that left it there is resumed, else phase 2 runs with --firmware. Devices not in
a loader, busy or unreachable are left alone and listed with the reason.

"""
    + CONTROL_TEXT
    + """
Exit codes: 0 nothing is left in a loader that netota could not take on (with --wait: every rescue
job succeeded); 1 a device needs an image named (--firmware); with --wait, a rescue job's outcome
(1 failed, 2 unverified, 4 aborted, 64 an image of the other kind); 64 bad arguments or a request
refused as bad (an unknown device, a bad firmware name); 69 the daemon can't be reached, went away
or is stopping; 70 an internal error of the client; 75 refused as busy (409); 130 interrupted
(Ctrl-C: a rescue job keeps running in the daemon); 141 the reader of the output went away.
"""
)


def add_parser(subparsers: Any) -> None:
    def sub(
        parent: Any, name: str, help_text: str, command: Any, draws: bool = False, epilog: str = EPILOG
    ) -> argparse.ArgumentParser:
        return add_client_command(parent, name, help_text, command, epilog, draws)

    batch = subparsers.add_parser(
        "batch",
        help="Roll a firmware out to several devices as one batch: canary, failure threshold, pre-flight, skip-current.",
        description="Batches: one firmware for a set of devices, under a policy, journaled by the daemon.",
        epilog=EPILOG,
        formatter_class=arguments.WrappingHelpFormatter,
    )
    commands = batch.add_subparsers(dest="batch_command", metavar="COMMAND", required=True)

    p = sub(
        commands,
        "start",
        "Start a batch: FIRMWARE (a file in the daemon's firmware_dir) for the devices given.",
        cmd_batch_start,
        draws=True,
    )
    p.usage = "netota batch start [options] FIRMWARE (--all | --tag TAG | DEVICE ...)"
    p.add_argument("firmware", metavar="FIRMWARE")
    p.add_argument("devices", nargs="*", metavar="DEVICE")
    p.add_argument("--all", action="store_true", help="every configured device")
    p.add_argument("--tag", metavar="TAG", help="the devices whose config has this tag (tags = [...])")
    p.add_argument(
        "--canary",
        type=arguments.whole_number(0),
        metavar="N",
        help="upgrade the first N devices first; the rest only if all N succeeded",
    )
    p.add_argument(
        "--max-failures",
        type=arguments.whole_number(1),
        metavar="F",
        help="once F jobs failed, start no more (running ones finish)",
    )
    p.add_argument(
        "--max-parallel",
        type=arguments.whole_number(1),
        metavar="N",
        help="at most N jobs of this batch at once (within the daemon's)",
    )
    p.add_argument(
        "--skip-current", metavar="VERSION", help="skip devices that already run VERSION (the image's version)"
    )
    p.add_argument(
        "--skip-current-known",
        action="store_true",
        help="skip devices that already run the version an earlier job with this same image read back",
    )
    p.add_argument("--no-preflight", action="store_true", help="do not probe the devices first")
    p.add_argument("--no-resume", action="store_true", help="do not resume jobs a daemon restart interrupted")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="override one engine timeout for every job")
    p.add_argument("--wait", action="store_true", help="follow the batch to its end: a line per device, then a table")
    p.add_argument("--junit", metavar="FILE", help="with --wait: write a JUnit XML report (one test case per device)")

    p = sub(commands, "show", "Show one batch: its policy, its devices and how each ended.", cmd_batch_show)
    p.add_argument("batch", metavar="ID")

    p = sub(commands, "watch", "Follow a batch to its end, a line per device.", cmd_batch_watch, draws=True)
    p.add_argument("batch", metavar="ID")
    p.add_argument("--junit", metavar="FILE", help="write a JUnit XML report when it ends")

    p = sub(
        commands,
        "cancel",
        "Cancel a batch: devices not started are skipped, running jobs stopped (STOP).",
        cmd_batch_cancel,
    )
    p.add_argument("batch", metavar="ID")
    p.add_argument("--reason", help="recorded with the batch")

    p = sub(subparsers, "batches", "List batches, newest first.", cmd_batches)
    p.add_argument(
        "--limit", type=arguments.whole_number(1), help="at most this many (1 to 1000; default: the daemon's page, 50)"
    )
    p.add_argument("--cursor", help="the page after the one that printed it (its last line: older batches: ...)")

    p = sub(
        subparsers,
        "rescue",
        "Finish devices left waiting in their phase-2 loader: resume the job that left each there, or phase 2 with its image.",
        cmd_rescue,
        draws=True,
        epilog=RESCUE_EPILOG,
    )
    p.add_argument("devices", nargs="*", metavar="DEVICE", help="only these devices (default: all)")
    p.add_argument("--firmware", metavar="FILE", help="the image to finish with, when the journal knows none")
    p.add_argument("--wait", action="store_true", help="follow the rescue jobs to their end")
