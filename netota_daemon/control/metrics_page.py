"""``GET /metrics``: the daemon's Prometheus exposition (see ``docs/metrics.md``).

Served beside the API on the control endpoint and on ``daemon.web``, and alone on ``daemon.metrics``.
With ``token`` set, a request must carry ``Authorization: Bearer TOKEN`` (compared as bytes, in
constant time), as the control API's requests do.
"""

from __future__ import annotations

import hmac

from twisted.web.resource import Resource

from netota_daemon.control.errors import ApiError
from netota_daemon.control.routing import HttpRequest
from netota_daemon.daemon.metrics import DaemonMetrics


class MetricsPage(Resource):
    isLeaf = True

    def __init__(self, metrics: DaemonMetrics, token: str | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.metrics = metrics
        self._token = token.encode("utf-8") if token is not None else None

    def render(self, request: HttpRequest) -> bytes:
        error = self._refusal(request)
        if error is not None:
            request.setResponseCode(error.status)
            for name, value in error.headers.items():
                request.setHeader(name.encode(), value.encode())
            request.setHeader(b"content-type", b"application/json")
            return error.body()
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        body, content_type = self.metrics.exposition(accept)
        request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"cache-control", b"no-store")
        return body

    def _refusal(self, request: HttpRequest) -> ApiError | None:
        if [p for p in request.postpath if p]:
            return ApiError(404, "not_found", "no such resource (the metrics are at /metrics)")
        if request.method not in (b"GET", b"HEAD"):
            return ApiError(405, "method_not_allowed", "only GET is allowed here", {"allow": "GET"})
        if self._token is not None:
            scheme, _, given = (request.getHeader(b"authorization") or b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(b" \t"), self._token):
                return ApiError(
                    401,
                    "unauthorized",
                    "a valid bearer token is required (Authorization: Bearer TOKEN)",
                    {"www-authenticate": 'Bearer realm="netota"'},
                )
        return None
