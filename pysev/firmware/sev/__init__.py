"""The SEV / SEV-ES firmware command set (AMD SEV API pub. #55766).

``abi`` (command ids, policy, states, sizes, command buffers), ``platform`` (the state table and the
platform, guest, launch and debug commands: ``Platform``), ``transport`` (SEND_*, RECEIVE_* and their batch
forms), ``session`` (session blob, packets, MACs), ``identity`` (PEK/PDH/OCA/CEK), ``guest`` (a guest's
firmware context).
"""

from pysev.firmware.sev.abi import (  # noqa: F401  (the names other layers use)
    CBITPOS,
    REDUCED_PHYS_BITS,
    Cmd,
    GuestState,
    PlatformState,
    Policy,
    make_policy,
    policy_api,
)
from pysev.firmware.sev.platform import Platform  # noqa: F401
