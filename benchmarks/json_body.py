"""How long the control API's bounded JSON decoder takes on the worst bodies a client can send.

Every request body is decoded on the reactor, so a body that takes long to refuse stalls every
device's timers: run ``python -m benchmarks.json_body`` (on demand, not in ``make test``).
"""

from __future__ import annotations

import time

from netota_daemon.control.json_body import MAX_BODY, BodyError, decode_json

BODIES = {
    "unterminated string of escapes": b'"' + b'\\"' * (MAX_BODY // 2 - 1),
    "deep nesting": b"[" * (MAX_BODY // 2) + b"]" * (MAX_BODY // 2),
    "many short strings": b"[" + b'"x",' * (MAX_BODY // 4 - 2) + b'"x"]',
}


def main() -> None:
    for name, body in BODIES.items():
        start = time.perf_counter()
        try:
            decode_json(body)
            result = "accepted"
        except BodyError as e:
            result = f"refused: {e.message[:50]}"
        print(f"{name:32} {len(body):6} bytes  {1000 * (time.perf_counter() - start):8.1f} ms  {result}")


if __name__ == "__main__":
    main()
