"""Page and transport-packet geometry: declared here once, imported by the kernels and by every pysev
layer (firmware, KVM face, migration stream).

A guest page is 4 KiB (one XTS data unit, one transport packet). The SEND/RECEIVE_UPDATE_DATA packet
header is ``LE32 FLAGS ‖ IV[16] ‖ MAC[32]`` (AMD SEV API pub. #55766, SEND_UPDATE_DATA; AMD's firmware
source ``sev_mcmd.h``; byte offsets in ``docs/formats.md``).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

#: Bytes per guest page.
PAGE_SIZE = 4096
PAGE_SHIFT = 12

#: The transport packet header, field by field (little-endian FLAGS).
PACKET_HEADER = np.dtype([("flags", "<u4"), ("iv", "u1", (16,)), ("mac", "u1", (32,))])
PACKET_HEADER_SIZE = PACKET_HEADER.itemsize  # 52
_HEADER_FIELDS = PACKET_HEADER.fields
assert _HEADER_FIELDS is not None  # a structured dtype has fields
PACKET_FLAGS_OFFSET = _HEADER_FIELDS["flags"][1]  # 0
PACKET_IV_OFFSET = _HEADER_FIELDS["iv"][1]  # 4
PACKET_MAC_OFFSET = _HEADER_FIELDS["mac"][1]  # 20
PACKET_IV_SIZE = 16
PACKET_MAC_SIZE = 32
#: FLAGS bit 0: the payload is compressed (no firmware supports it: UNSUPPORTED).
PACKET_FLAG_COMPRESSED = 1 << 0

assert PACKET_HEADER_SIZE == 52 and PACKET_MAC_OFFSET + PACKET_MAC_SIZE == PACKET_HEADER_SIZE


class RecordSink(Protocol):
    """Where the send pipeline hands its packets, slice by slice (``send_pages(..., on_slice=sink)``).

    With a sink, the pipeline's ``headers``/``trans`` outputs are a ring of n rows: page i of the batch
    goes to row i % n, and after every n pages (and after the last) the pipeline calls ``sink(start,
    stop)``: pages ``[start, stop)`` of the batch are ready in rows ``[0, stop - start)`` and must be
    consumed before the call returns, because the next slice overwrites them. The migration stream's
    ``RecordRing.put`` is the sink that writes them to the connection while they are in cache
    (``docs/design.md``). An exception from the sink ends the batch.
    """

    def __call__(self, start: int, stop: int, /) -> None: ...
