"""``HttpRoot``: what each of the daemon's HTTP endpoints serves at its top level.

- the control endpoint: the API under ``/v1/`` and ``/metrics``;
- ``daemon.web``: the same, and the dashboard: ``GET /`` (the page) and ``/assets/NAME`` (its script
  and style), shipped in the package (``netota_daemon/control/dashboard/``), read once at start-up;
  no CDN, nothing fetched at run time. The page and its assets carry no secret and need no token:
  a person enters the token in the page, which sends it on every API request;
- ``daemon.metrics``: ``/metrics`` alone.

Every other path goes to the API resource, which answers it (a JSON 404 outside ``/v1/``).
"""

from __future__ import annotations

from importlib import resources

from twisted.web.resource import IResource, Resource

from netota_daemon.control.errors import ApiError
from netota_daemon.control.routing import HttpRequest

#: The dashboard's files: name -> content type.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
#: The page may load and connect to this daemon only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def load_assets() -> dict[str, bytes]:
    """The dashboard's files from the installed package."""
    folder = resources.files("netota_daemon.control") / "dashboard"
    return {name: (folder / name).read_bytes() for name in ASSETS}


class _NotFound(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render(self, request: HttpRequest) -> bytes:
        error = ApiError(404, "not_found", f"no such resource {request.path.decode('utf-8', 'replace')[:200]}")
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return error.body()


class Asset(Resource):
    isLeaf = True

    def __init__(self, name: str, body: bytes) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.name = name
        self.body = body

    def render(self, request: HttpRequest) -> bytes:
        if [p for p in request.postpath if p]:
            return _NotFound().render(request)
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET")
            request.setHeader(b"content-type", b"application/json")
            return ApiError(405, "method_not_allowed", "only GET is allowed here").body()
        request.setHeader(b"content-type", ASSETS[self.name].encode())
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY.encode())
        return self.body


class _Assets(Resource):
    def __init__(self, assets: dict[str, bytes]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._assets = {name: Asset(name, body) for name, body in assets.items() if name != "index.html"}

    def getChild(self, path: bytes, request: HttpRequest) -> IResource:
        return self._assets.get(path.decode("utf-8", "replace"), _NotFound())

    def render(self, request: HttpRequest) -> bytes:
        return _NotFound().render(request)


class HttpRoot(Resource):
    """``api``: the control API's resource (None: only ``/metrics`` is served); ``metrics``: the
    ``/metrics`` resource, if any; ``dashboard``: the dashboard's files, if this endpoint serves it."""

    def __init__(
        self,
        api: IResource | None,
        metrics: IResource | None = None,
        dashboard: dict[str, bytes] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._api = api or _NotFound()
        self._metrics = metrics
        self._index = Asset("index.html", dashboard["index.html"]) if dashboard else None
        self._assets = _Assets(dashboard) if dashboard else None

    def getChild(self, path: bytes, request: HttpRequest) -> IResource:
        rest = [p for p in request.postpath if p]
        if path == b"metrics" and self._metrics is not None:
            return self._metrics
        if path == b"" and not rest and self._index is not None:
            return self._index
        if path == b"assets" and self._assets is not None:
            return self._assets
        # Everything else is the API's: give it the whole path back, as if it were the root.
        request.postpath.insert(0, request.prepath.pop())
        return self._api

    def render(self, request: HttpRequest) -> bytes:  # only reached with an empty path, which getChild takes
        return _NotFound().render(request)
