"""Every exit code of the ``netota`` command, in one place.

``netota flash`` and a waited job (``netota upgrade --wait``, ``watch JOB``, ``resume --wait``) exit
with their outcome's code; the other codes follow ``sysexits.h`` where one fits.
"""

from __future__ import annotations

from netota_daemon.engine.outcome import OutcomeKind

#: The outcome of an upgrade, as an exit code.
EXIT_CODES = {
    OutcomeKind.SUCCEEDED: 0,
    OutcomeKind.ALREADY_CURRENT: 0,  # 3 with --strict
    OutcomeKind.FAILED: 1,
    OutcomeKind.UNVERIFIED: 2,
    OutcomeKind.ABORTED: 4,
    OutcomeKind.NOT_APPLICABLE: 64,  # the image's kind is not the device's: refused, nothing sent
}
EXIT_ALREADY_CURRENT_STRICT = 3
EXIT_FAILED = 1  # a job failed; ``netota firmware add``: the daemon stored other bytes than were sent
EXIT_USAGE = 64  # EX_USAGE: bad arguments, or a request the daemon refused as bad (400/401/403/404); nothing sent
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: the daemon can't be reached, went away or stopped before the job ended
EXIT_SOFTWARE = 70  # EX_SOFTWARE: an internal error of the client
EXIT_CANT_CREATE = 73  # EX_CANTCREAT: the --junit report could not be written (the outcome was printed)
EXIT_BUSY = 75  # EX_TEMPFAIL: the device is busy, or the job is in a state that refuses the request (409)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: the client was interrupted; a daemon's job is not affected
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: whoever read the output stopped reading (``| head``)


def exit_code(kind: OutcomeKind, strict: bool = False) -> int:
    """The exit code for an outcome: ``already_current`` is 0, or 3 with ``strict``."""
    if kind is OutcomeKind.ALREADY_CURRENT and strict:
        return EXIT_ALREADY_CURRENT_STRICT
    return EXIT_CODES[kind]
