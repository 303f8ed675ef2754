"""The one place that picks the csev backend.

Native kernels (Cython over OpenSSL's libcrypto, ``csev._xts``/``_transport``/``_wrap``; Cython
``csev._bitmap``) unless ``CSEV_PURE=1`` or they cannot be loaded; then the plain-Python/numpy twins
(``csev._fallback_crypto``, ``csev._fallback_bitmap``), same signatures and outputs, announced by one
logged line that says why: a slower backend is never chosen silently.
"""

from __future__ import annotations

import logging
import os

__all__ = [
    "BACKEND",
    "aes128_ctr",
    "bitmap_clear_range",
    "bitmap_count",
    "bitmap_extract",
    "bitmap_find_next",
    "bitmap_from_ranges",
    "bitmap_set_range",
    "bitmap_split",
    "bitmap_sync",
    "bitmap_to_ranges",
    "default_threads",
    "hmac_sha256",
    "receive_pages",
    "send_pages",
    "unwrap_tk",
    "wrap_tk",
    "xts_decrypt",
    "xts_encrypt",
]

log = logging.getLogger("csev")


def default_threads() -> int:
    """Threads a kernel uses when ``threads=None``: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


PURE = os.environ.get("CSEV_PURE", "") not in ("", "0")
_why: list[str] = []

if PURE:
    _why.append("CSEV_PURE=1")
    _native_crypto = False
else:
    try:
        from csev import _libcrypto
    except ImportError as exc:
        _why.append(f"native crypto kernels not built ({exc})")
        _native_crypto = False
    else:
        if _libcrypto.AVAILABLE:
            try:
                from csev._transport import receive_pages, send_pages
                from csev._wrap import aes128_ctr, hmac_sha256, unwrap_tk, wrap_tk
                from csev._xts import xts_decrypt, xts_encrypt

                _native_crypto = True
            except ImportError as exc:
                _why.append(f"native crypto kernels not built ({exc})")
                _native_crypto = False
        else:
            _why.append(f"libcrypto not found ({_libcrypto.REASON})")
            _native_crypto = False

if _native_crypto:
    BACKEND = f"libcrypto:{_libcrypto.PATH}"
else:
    from csev._fallback_crypto import (  # noqa: F811
        aes128_ctr,
        hmac_sha256,
        receive_pages,
        send_pages,
        unwrap_tk,
        wrap_tk,
        xts_decrypt,
        xts_encrypt,
    )

    BACKEND = "python"

_native_bitmap = False
if not PURE:
    try:
        from csev._bitmap import (
            bitmap_clear_range,
            bitmap_count,
            bitmap_extract,
            bitmap_find_next,
            bitmap_from_ranges,
            bitmap_set_range,
            bitmap_split,
            bitmap_sync,
            bitmap_to_ranges,
        )

        _native_bitmap = True
    except ImportError as exc:
        _why.append(f"native bitmap kernels not built ({exc})")
if not _native_bitmap:
    from csev._fallback_bitmap import (  # noqa: F811
        bitmap_clear_range,
        bitmap_count,
        bitmap_extract,
        bitmap_find_next,
        bitmap_from_ranges,
        bitmap_set_range,
        bitmap_split,
        bitmap_sync,
        bitmap_to_ranges,
    )

#: Why the plain-Python kernels serve ("" when fully native).
FALLBACK_REASON = "; ".join(_why)
if _why:
    what = "crypto and bitmap" if not (_native_crypto or _native_bitmap) else ("bitmap" if _native_crypto else "crypto")
    slower = "" if _native_crypto else ", ~6x slower"
    msg = f"csev: {FALLBACK_REASON}; using the plain-Python {what} kernels{slower}"
    # An explicit CSEV_PURE=1 is a choice, not a problem: log it at INFO; anything else warns.
    log.log(logging.INFO if PURE else logging.WARNING, msg)
