"""The firmware endpoints: ``GET /v1/firmware`` (the catalogue of ``firmware_dir``),
``GET /v1/firmware/NAME``, ``PUT /v1/firmware/NAME`` (upload) and ``DELETE /v1/firmware/NAME``.

The catalogue's work (hashing, copying, fsync) blocks, so the catalogue runs it through its
``run_blocking`` (a thread in the daemon), deciding on the reactor what a job could race (see
:mod:`netota_daemon.daemon.firmware_catalog`). An upload's body has arrived whole before the handler runs: the
control channel bounds it to :data:`MAX_UPLOAD` bytes as it arrives, and Twisted keeps a body that
large in an anonymous temporary file on disk, never in memory; the catalogue then copies it into
``firmware_dir`` through a hidden temporary file that is fsynced and renamed.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from netota_daemon.control.errors import ApiError
from netota_daemon.control.routing import API_PREFIX, Answer, ApiRequest, Route
from netota_daemon.daemon.firmware_catalog import CatalogError, FirmwareCatalog

T = TypeVar("T")

#: What each refusal of the catalogue becomes: (HTTP status, error code).
REFUSALS = {
    "bad_name": (400, "bad_firmware_name"),
    "outside": (403, "firmware_outside"),
    "not_found": (404, "firmware_not_found"),
    "in_use": (409, "firmware_in_use"),
    "exists": (409, "firmware_exists"),
    "too_large": (413, "too_large"),
    "empty": (400, "firmware_invalid"),
    "unavailable": (503, "firmware_dir_unavailable"),
}


def refusal(error: CatalogError) -> ApiError:
    status, code = REFUSALS.get(error.reason, (400, "firmware_invalid"))
    return ApiError(status, code, error.message)


def is_upload(method: bytes, path: bytes) -> bool:
    """Whether a request line is a firmware upload (its body may be up to the catalogue's limit)."""
    return method.upper() == b"PUT" and path.split(b"?", 1)[0].startswith(f"/{API_PREFIX}/firmware/".encode())


class FirmwareEndpoints:
    def __init__(self, catalog: FirmwareCatalog) -> None:
        self.catalog = catalog

    def routes(self) -> list[Route]:
        return [
            Route(("firmware",), {"GET": self.list}),
            Route(("firmware", "{name}"), {"GET": self.show, "PUT": self.upload, "DELETE": self.remove}),
        ]

    @staticmethod
    async def _answer(work: Awaitable[T]) -> T:
        """What the catalogue answers; its refusal as the API's error."""
        try:
            return await work
        except CatalogError as e:
            raise refusal(e) from None

    async def list(self, request: ApiRequest) -> Answer:
        request.query(())
        items = await self._answer(self.catalog.list())
        return Answer({"firmware": [item.to_json() for item in items]})

    async def show(self, request: ApiRequest) -> Answer:
        request.query(())
        name = request.params["name"]
        item = await self._answer(self.catalog.get(name))
        return Answer({"firmware": item.to_json()})

    async def upload(self, request: ApiRequest) -> Answer:
        request.query(())
        name = request.params["name"]
        body = request.request.content
        if body is None:
            raise ApiError(400, "firmware_invalid", "the upload has no body")
        body.seek(0)
        # ``If-None-Match: *`` (RFC 9110 13.1.2): store only if no image has that name yet.
        replace = (request.request.getHeader(b"if-none-match") or b"").strip() != b"*"
        item = await self._answer(self.catalog.add(name, body, replace=replace))
        return Answer({"firmware": item.to_json()}, 201, {"location": f"/{API_PREFIX}/firmware/{name}"})

    async def remove(self, request: ApiRequest) -> Answer:
        request.query(())
        name = request.params["name"]
        item = await self._answer(self.catalog.remove(name))
        return Answer({"removed": item.to_json()})
