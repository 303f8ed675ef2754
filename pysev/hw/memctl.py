"""The SEV memory controller model: per-ASID VEKs, AES-128-XTS with the host address as the tweak.

This is hardware, not firmware: the firmware installs a guest's VEK into an ASID key slot (ACTIVATE)
and the guest's C-bit accesses go through it. It never returns a key. Accesses with the C-bit clear
(shared pages) bypass it and touch DRAM directly.

Encryption unit: one XTS data unit per 4 KiB page, tweak = host physical address (a model of the real
engine's address tweak: AMD64 Architecture Programmer's Manual, Vol. 2, "Secure Memory Encryption").
Sub-page accesses (firmware commands take 16-byte granular lengths) are done as a
read-modify-write of the containing pages, so bytes outside the range keep their plaintext.
"""

from __future__ import annotations

import numpy as np

import csev
from csev.packet import PAGE_SHIFT, PAGE_SIZE
from pysev.hw.hostmem import HostMemory


class MemoryController:
    def __init__(self, dram: HostMemory) -> None:
        self.dram = dram
        self._slots: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return f"MemoryController(asids={sorted(self._slots)})"

    # -- key slots (driven by the firmware) ------------------------------------------------------
    def install_key(self, asid: int, vek: bytes) -> None:
        self._slots[asid] = bytes(vek)

    def remove_key(self, asid: int) -> None:
        self._slots.pop(asid, None)

    def has_key(self, asid: int) -> bool:
        return asid in self._slots

    def _vek(self, asid: int) -> bytes:
        try:
            return self._slots[asid]
        except KeyError:
            raise PermissionError(f"no key installed for ASID {asid}") from None

    # -- whole pages: the fast path, batch in --------------------------------------------------------
    def write_pages(self, asid: int, frames: np.ndarray, plaintext: np.ndarray) -> None:
        """Encrypted write of ``plaintext[i]`` into frame ``frames[i]`` (C-bit set)."""
        frames = np.ascontiguousarray(frames, dtype=np.uint64)
        csev.xts_encrypt(
            self._vek(asid),
            plaintext,
            self.dram.frames,
            frames << np.uint64(PAGE_SHIFT),
            dst_index=frames.astype(np.int64),
        )

    def read_pages(self, asid: int, frames: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Decrypted read of whole frames (C-bit set)."""
        frames = np.ascontiguousarray(frames, dtype=np.uint64)
        if out is None:
            out = np.empty((frames.size, PAGE_SIZE), dtype=np.uint8)
        csev.xts_decrypt(
            self._vek(asid), self.dram.frames, out, frames << np.uint64(PAGE_SHIFT), src_index=frames.astype(np.int64)
        )
        return out

    # -- arbitrary 16-byte-granular ranges (firmware commands) ----------------------------------------
    def read(self, asid: int, hpa: int, length: int) -> bytes:
        frames, lo = self._span(hpa, length)
        return self.read_pages(asid, frames).reshape(-1)[lo : lo + length].tobytes()

    def write(self, asid: int, hpa: int, data: bytes) -> None:
        frames, lo = self._span(hpa, len(data))
        pages = self.read_pages(asid, frames)
        pages.reshape(-1)[lo : lo + len(data)] = np.frombuffer(data, dtype=np.uint8)
        self.write_pages(asid, frames, pages)

    def _span(self, hpa: int, length: int) -> tuple[np.ndarray, int]:
        if not self.dram.contains(hpa, length):
            raise IndexError(f"HPA range [{hpa:#x}, +{length:#x}) outside host memory")
        first, last = hpa >> PAGE_SHIFT, (hpa + max(length, 1) - 1) >> PAGE_SHIFT
        return np.arange(first, last + 1, dtype=np.uint64), hpa - (first << PAGE_SHIFT)
