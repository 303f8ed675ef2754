"""Certificate files: bounded reads, decoded by size. The only I/O of ``pysev.firmware.certs``."""

from __future__ import annotations

from pathlib import Path

from pysev.firmware.certs.amd_cert import AMD_CERT_FIXED_SIZE, AMD_CERT_MAX_SIZE, AmdCert, split_amd_chain
from pysev.firmware.certs.keys import CertError
from pysev.firmware.certs.sev_cert import SEV_CERT_SIZE, SevCert


def _read_bounded(path: str | Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CertError(str(path), None, f"file is larger than {limit} bytes")
    return data


def load_sev_cert(path: str | Path) -> SevCert:
    return SevCert.from_bytes(_read_bounded(path, SEV_CERT_SIZE))


def load_amd_cert(path: str | Path, *, allow_unsigned: bool = False) -> AmdCert:
    return AmdCert.from_bytes(_read_bounded(path, AMD_CERT_MAX_SIZE), allow_unsigned=allow_unsigned)


def read_cert_file(path: str | Path) -> SevCert | AmdCert | tuple[AmdCert, AmdCert]:
    """Decode a file by its size: a SEV cert (2084), one AMD cert, or an ASK ‖ ARK chain."""
    data = _read_bounded(path, 2 * AMD_CERT_MAX_SIZE)
    if len(data) == SEV_CERT_SIZE:
        return SevCert.from_bytes(data)
    try:
        return AmdCert.from_bytes(data, allow_unsigned=True)
    except CertError as single:
        if len(data) > AMD_CERT_FIXED_SIZE and len(data) > AmdCert.signed_size_at(data, 0):
            return split_amd_chain(data)
        raise single
