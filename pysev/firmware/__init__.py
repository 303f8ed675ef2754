"""The simulated SEV firmware: ``Platform`` (state machines, commands) and its command buffers."""
from pysev.firmware.commands import Cmd, GuestState, PlatformState, Policy, make_policy, policy_api  # noqa: F401
from pysev.firmware.platform import CBITPOS, REDUCED_PHYS_BITS, Platform  # noqa: F401
