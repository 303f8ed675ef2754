"""The SEV / SEV-ES firmware command set (AMD pub. #55766): ``Platform`` and its command buffers."""
from pysev.firmware.sev.abi import Cmd, GuestState, PlatformState, Policy, make_policy, policy_api  # noqa: F401
from pysev.firmware.sev.platform import CBITPOS, REDUCED_PHYS_BITS, Platform  # noqa: F401
