"""A guest's firmware context (AMD ``sev_guest.h`` ``sev_guest_t``): what the SEV firmware keeps per handle.

The secrets (VEK, TEK, TIK) live only here and in the memory controller's key slots; ``repr`` shows
none of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

from pysev.firmware.sev.abi import GuestState, Policy


def new_vek(trng: Callable[[int], bytes]) -> bytes:
    """A fresh 32-byte VEK (two AES-128 halves for the memory controller's XTS)."""
    while True:  # XTS rejects equal halves; the TRNG will not produce them, but never hand one out
        vek = trng(32)
        if vek[:16] != vek[16:]:
            return vek


@dataclasses.dataclass(eq=False, repr=False)
class GuestContext:
    handle: int
    policy: int
    state: GuestState
    vek: bytes
    asid: int = 0
    tek: bytes = bytes(16)
    tik: bytes = bytes(16)
    digest: hashlib._Hash = dataclasses.field(default_factory=hashlib.sha256)  # the launch digest
    measure: bytes = bytes(32)

    def __repr__(self) -> str:
        return f"GuestContext(handle={self.handle}, policy={self.policy:#x}, state={self.state.name}, asid={self.asid})"

    def zeroize_channel(self) -> None:
        self.tek = self.tik = bytes(16)

    @property
    def es(self) -> bool:
        return bool(self.policy & Policy.ES)
