"""The device description document (``dev_desc.txt``, HTTP 8080) as a typed value.

No I/O here: bytes of the document in, :class:`DeviceDescription` out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

DESCRIPTION_PATH = "/mnt/spiflash/res/dev_desc.txt"

#: The phase-2 loader's fixed document (research §3); exactly 454 bytes.
LOADER_DOCUMENT = (
    b'{"app_list":{"match_android_ver":["1.0","2.0"],"match_ios_ver":["1.0","2.0"]},'
    b'"forward_support":["0"],"behind_support":["0"],"forward_record_support":["0"],'
    b'"behind_record_support":["0"],"rtsp_forward_support":["0"],"rtsp_behind_support":["0"],'
    b'"device_type":"1","net_type":"1","rts_type":"0","product_type":"AC79x_wifi_camera",'
    b'"support_projection":"0","ota_type":"1","ota_step":"1","firmware_version":"1.0.1",'
    b'"match_app_type":"DVRunning2","uuid":"xxxxxx"}'
)
assert len(LOADER_DOCUMENT) == 454


class DescriptionError(ValueError):
    """The description document is not a JSON object."""


@dataclass(frozen=True)
class DeviceDescription:
    ota_type: str | None
    ota_step: str | None
    firmware_version: str | None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def single_backup(self) -> bool:
        """``ota_type`` "1"; "0" or absent means double backup."""
        return self.ota_type == "1"

    @property
    def in_loader(self) -> bool:
        """``ota_step`` "1": the phase-2 loader is running."""
        return self.single_backup and self.ota_step == "1"


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    return str(value).strip()


def parse_description(body: bytes) -> DeviceDescription:
    """Parse the document; tolerant of spacing, a trailing NUL and missing fields."""
    text = body.rstrip(b"\x00 \r\n\t")
    try:
        raw = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DescriptionError(f"the description document is not valid JSON: {e}") from None
    except RecursionError:  # "[[[[...": too deep for the JSON parser
        raise DescriptionError("the description document is JSON nested too deeply to decode") from None
    if not isinstance(raw, dict):
        raise DescriptionError("the description document is JSON but not an object")
    return DeviceDescription(
        ota_type=_as_text(raw.get("ota_type")),
        ota_step=_as_text(raw.get("ota_step")),
        firmware_version=_as_text(raw.get("firmware_version")),
        raw=raw,
    )


def main_firmware_document(firmware_version: str, single_backup: bool = True, uuid: str = "xxxxxx") -> bytes:
    """A main-firmware document shaped like the SDK's ``dev_desc.h`` output (spaces after colons).

    ``firmware_version`` and ``uuid`` are JSON-encoded, so any text gives a valid document."""
    ota_type = "1" if single_backup else "0"
    version, uuid = json.dumps(firmware_version), json.dumps(uuid)
    return (
        '{"app_list": {"match_android_ver": ["1.0","2.0"],"match_ios_ver": ["1.0","2.0"]},'
        ' "forward_support": ["0"],"behind_support": ["0"],"forward_record_support": ["0"],'
        ' "behind_record_support": ["0"],"rtsp_forward_support": ["0"],"rtsp_behind_support": ["0"],'
        ' "device_type": "1","net_type": "1","rts_type": "0","product_type": "AC79x_wifi_camera",'
        f' "support_projection":"0","ota_type": "{ota_type}","ota_step": "0",'
        f' "firmware_version": {version},"match_app_type": "DVRunning 2","uuid": {uuid}}}'
    ).encode()
