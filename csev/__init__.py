"""csev: native kernels for pysev, over whole batches of 4 KiB pages.

Layer rule: csev knows buffers, keys and bits; it has no firmware state, policy or I/O. pysev imports
csev, never the reverse. Page and packet-header geometry is declared once, in ``csev.packet``;
``csev.errors`` holds ``MacError``.

Kernel families (one ``_name.pyx`` each, with a plain-Python/numpy twin of the same signature in
``csev/_fallback_crypto.py`` or ``csev/_fallback_bitmap.py``):

Memory encryption: a model of the SEV memory controller, whose AES engine takes a tweak from the host
physical address (Kaplan, Powell and Woller, "AMD Memory Encryption", AMD white paper, 2016)
    ``xts_encrypt(key, src, dst, tweaks, src_index=None, dst_index=None, *, threads=None)``
    ``xts_decrypt(...)``  (same signature)
        AES-128-XTS, ``key`` = the guest's 32-byte VEK (two AES-128 halves; equal halves are
        rejected), one XTS data unit per 4 KiB page, tweak = host physical address of the page as a
        16-byte little-endian integer (``tweaks[i]``, uint64). ``src``/``dst`` are C-contiguous
        ``uint8[n, 4096]``; ``src_index``/``dst_index`` (int64) select rows of a large memory array
        (gather/scatter) without copying it; ``None`` means rows 0..k-1. In place when ``src is dst``.
        Because the tweak is the host address, the same plaintext at another host address gives
        other ciphertext: ciphertext cannot be copied between hosts, only re-encrypted by firmware.

Transport pipelines: SEND_UPDATE_DATA and RECEIVE_UPDATE_DATA (#55766; AMD's firmware source
``sev_mcmd.c``, ``sev_channel.c``; packet layout in ``docs/formats.md``)
    ``send_pages(vek, tek, tik, mem, index, tweaks, headers, trans, ivs=None, *, threads=None,
    nontemporal=True, on_slice=None)``
        SEND_UPDATE_DATA for a batch: XTS-decrypt ``mem[index[i]]`` at ``tweaks[i]`` → AES-128-CTR
        under TEK with IV ``ivs[i]`` (fresh random when None) → MAC = HMAC-SHA256(TIK, 0x02 ‖
        LE32(flags=0) ‖ IV ‖ LE32(4096) ‖ LE32(4096) ‖ ciphertext). Writes ``headers[i]`` (52 bytes:
        flags ‖ IV ‖ MAC) and ``trans[i]`` (4096 bytes). ``trans`` goes past the cache (non-temporal
        stores) unless ``nontemporal=False``, for a small output read again at once. With
        ``on_slice`` (a ``csev.packet.RecordSink``), ``headers``/``trans`` are a ring of n rows (page i →
        row i % n) and ``on_slice(start, stop)`` consumes each n-page slice before the rows are reused
        (one thread).
    ``receive_pages(vek, tek, tik, headers, trans, mem, index, tweaks, *, threads=None) -> status``
        RECEIVE_UPDATE_DATA for a batch: per packet, COMPRESSED flag → UNSUPPORTED (0x15); MAC checked
        in constant time before decrypting → BAD_MEASUREMENT (0x0B); else CTR-decrypt and
        XTS-encrypt into ``mem[index[i]]`` at ``tweaks[i]``. Returns ``uint32[k]`` firmware statuses
        (0 = SUCCESS). A bad packet writes nothing; good packets in the batch are still applied.

Key wrapping and one-shot primitives of SEND_START / RECEIVE_START (#55766; ``sev_channel.c``)
    ``aes128_ctr(key, iv, data) -> bytes``, ``hmac_sha256(key, data) -> bytes``
    ``wrap_tk(kek, kik, wrap_iv, tek, tik) -> (wrap_tk, wrap_mac)``
    ``unwrap_tk(kek, kik, wrap_iv, wrap_tk, wrap_mac) -> (tek, tik)``  (MAC first; MacError)

Bitmaps over uint64 words, 1 bit per page, little-endian bit order as KVM's dirty log (Linux
``Documentation/virt/kvm/api.rst``, KVM_GET_DIRTY_LOG; QEMU ``include/exec/ram_addr.h``)
    ``bitmap_sync(log, dest) -> int``              fetch-and-clear log into dest, count newly dirty
    ``bitmap_split(dirty, enc, private, shared) -> (n_private, n_shared)``
    ``bitmap_extract(words, nbits=None) -> int64[]`` set-bit indices
    ``bitmap_find_next(words, start, nbits) -> int`` (``nbits`` when none)
    ``bitmap_count(words, nbits=None) -> int``
    ``bitmap_set_range(words, start, n)`` / ``bitmap_clear_range(words, start, n)``
    ``bitmap_to_ranges(words, nbits) -> int64[k, 2]`` (start, npages)
    ``bitmap_from_ranges(ranges, nbits) -> uint64[]``

Every kernel checks dtypes, shapes, key/IV sizes and index ranges once, with the GIL, and raises
``ValueError``/``IndexError`` before touching memory; loops then run without the GIL.
``threads`` (default: all usable cores) splits a large batch across cores.

Backend: the crypto kernels call OpenSSL's libcrypto (the one Python's ``_hashlib`` loads), resolved at
import time without headers. Where it cannot be found, or with ``CSEV_PURE=1``, the plain-Python twins
serve instead, with a one-line warning.
"""

from csev._dispatch import (  # noqa: F401  (public re-exports)
    BACKEND,
    aes128_ctr,
    bitmap_clear_range,
    bitmap_count,
    bitmap_extract,
    bitmap_find_next,
    bitmap_from_ranges,
    bitmap_set_range,
    bitmap_split,
    bitmap_sync,
    bitmap_to_ranges,
    default_threads,
    hmac_sha256,
    receive_pages,
    send_pages,
    unwrap_tk,
    wrap_tk,
    xts_decrypt,
    xts_encrypt,
)
from csev.errors import MacError  # noqa: F401
from csev.packet import PACKET_HEADER_SIZE as HEADER_SIZE  # noqa: F401
from csev.packet import PAGE_SIZE  # noqa: F401
