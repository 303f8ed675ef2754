"""Firmware status codes (AMD SEV API pub. #55766; Linux ``include/uapi/linux/psp-sev.h`` ``sev_ret_code``)
and the exceptions that carry them.

Firmware statuses and OS/transport errors are kept apart: a command that the firmware refuses returns
a ``SevStatus``; ``SevError`` carries one across Python call boundaries where a status
return would be lost (e.g. ``pysev.firmware.sev.session.open_session``).
"""

from __future__ import annotations

import enum


class SevStatus(enum.IntEnum):
    SUCCESS = 0x00
    INVALID_PLATFORM_STATE = 0x01
    INVALID_GUEST_STATE = 0x02
    INVALID_CONFIG = 0x03
    INVALID_LENGTH = 0x04
    ALREADY_OWNED = 0x05
    INVALID_CERTIFICATE = 0x06
    POLICY_FAILURE = 0x07
    INACTIVE = 0x08
    INVALID_ADDRESS = 0x09
    BAD_SIGNATURE = 0x0A
    BAD_MEASUREMENT = 0x0B
    ASID_OWNED = 0x0C
    INVALID_ASID = 0x0D
    WBINVD_REQUIRED = 0x0E
    DF_FLUSH_REQUIRED = 0x0F
    INVALID_GUEST = 0x10
    INVALID_COMMAND = 0x11
    ACTIVE = 0x12
    HWERROR_PLATFORM = 0x13
    HWERROR_UNSAFE = 0x14
    UNSUPPORTED = 0x15
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17
    SECURE_DATA_INVALID = 0x18


class SevError(Exception):
    """A firmware status raised as an exception. ``.status`` is the ``SevStatus``."""

    def __init__(self, status: SevStatus | int, message: str = "") -> None:
        try:
            status = SevStatus(status)
            name = status.name
        except ValueError:  # unknown codes are preserved, not collapsed
            name = f"UNKNOWN_STATUS_{int(status):#x}"
        self.status = status
        super().__init__(f"{name} ({int(status):#04x})" + (f": {message}" if message else ""))
