"""Migration status, parameters and capabilities: the state both ends of a migration report over QMP.

``MigrationStatus`` carries QEMU's names (``qapi/migration.json`` MigrationStatus). Every change of
status goes through ``StatusCell.set``, which checks it against ``TRANSITIONS``: the one place where the
lifecycle is written down, as QEMU's ``migrate_set_state`` is the one place that moves
``MigrationState.state`` (``migration/migration.c``).
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from typing import Any

from pysev.migration.transport import MAX_CHANNELS


class MigrationStatus(str, enum.Enum):
    """QEMU's MigrationStatus values that this engine enters (the string is what QMP shows), and one of
    pysev's own: ``x-commit-pending``, the decision taken but not yet confirmed by both ends (the source
    committed and the destination has not confirmed; or the destination holds a verified guest and has
    not learned the source's decision). QEMU has no such state (``docs/design.md``, "Commit")."""

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    FAILED = "failed"
    COMMIT_PENDING = "x-commit-pending"

    @property
    def finished(self) -> bool:
        return self in FINAL_STATUSES

    @property
    def in_progress(self) -> bool:
        return self in (
            MigrationStatus.SETUP,
            MigrationStatus.ACTIVE,
            MigrationStatus.CANCELLING,
            MigrationStatus.COMMIT_PENDING,
        )


FINAL_STATUSES = frozenset({MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED})

#: status -> the statuses it may move to. CANCELLING -> COMPLETED or COMMIT_PENDING: a cancel that
#: arrives after the source decided to commit cannot undo the decision.
_MS = MigrationStatus
TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    # The destination starts ACTIVE, as QEMU's incoming side does.
    _MS.NONE: frozenset({_MS.SETUP, _MS.ACTIVE}),
    _MS.SETUP: frozenset({_MS.ACTIVE, _MS.CANCELLING, _MS.FAILED}),
    _MS.ACTIVE: frozenset({_MS.CANCELLING, _MS.COMMIT_PENDING, _MS.COMPLETED, _MS.FAILED}),
    _MS.CANCELLING: frozenset({_MS.CANCELLED, _MS.COMMIT_PENDING, _MS.COMPLETED, _MS.FAILED}),
    _MS.COMMIT_PENDING: frozenset({_MS.COMPLETED, _MS.FAILED}),
    _MS.COMPLETED: frozenset(),
    _MS.FAILED: frozenset(),
    _MS.CANCELLED: frozenset(),
}


class InvalidTransitionError(RuntimeError):
    """A status change the lifecycle does not allow: a bug in the engine, never a peer's doing."""


class StatusCell:
    """A migration's status, changed only through ``set`` (thread-safe, checked against TRANSITIONS)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status = MigrationStatus.NONE

    @property
    def value(self) -> MigrationStatus:
        with self._lock:
            return self._status

    def set(self, to: MigrationStatus) -> None:
        with self._lock:
            if to not in TRANSITIONS[self._status]:
                raise InvalidTransitionError(f"migration status {self._status.value} -> {to.value}")
            self._status = to

    def set_if(self, current: frozenset[MigrationStatus], to: MigrationStatus) -> bool:
        """Move to ``to`` only from one of ``current`` (QEMU's compare-and-swap); True if it moved."""
        with self._lock:
            if self._status not in current:
                return False
            if to not in TRANSITIONS[self._status]:
                raise InvalidTransitionError(f"migration status {self._status.value} -> {to.value}")
            self._status = to
            return True


#: (field, low, high) of the integer parameters: QEMU's ranges (migration/options.c
#: migrate_params_check), the channels bounded by what the transport's hello carries.
_PARAMETER_RANGES = (
    ("downtime_limit", 0, 2_000_000),
    ("max_bandwidth", 0, 18_446_744_073_709),
    ("multifd_channels", 1, MAX_CHANNELS),
    ("throttle_trigger_threshold", 1, 100),
    ("cpu_throttle_initial", 1, 99),
    ("cpu_throttle_increment", 1, 99),
    ("max_cpu_throttle", 1, 99),
)


@dataclasses.dataclass
class MigrationParameters:
    """QEMU's migration parameters (qapi MigrationParameters) that this engine honours, with QEMU's
    defaults (max-bandwidth 128 MiB/s; ``pysev migrate`` passes 0, unlimited, by default)."""

    downtime_limit: int = 300  # ms
    max_bandwidth: int = 128 << 20  # bytes/s; 0 = unlimited
    multifd_channels: int = 2
    throttle_trigger_threshold: int = 50  # %
    cpu_throttle_initial: int = 20  # %
    cpu_throttle_increment: int = 10  # %
    cpu_throttle_tailslow: bool = False
    max_cpu_throttle: int = 99  # %
    sev_pdh: str = ""
    sev_plat_cert: str = ""
    sev_amd_cert: str = ""
    commit_timeout: float = 60.0  # s: how long either side waits for the other's verdict
    # s: how long the source keeps delivering its decision on new connections after the first failed
    commit_resume_timeout: float = 30.0

    def __post_init__(self) -> None:
        """Bad values are refused here, as QMP's migrate-set-parameters refuses them, naming the parameter."""
        for name, low, high in _PARAMETER_RANGES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name.replace('_', '-')}: an integer from {low} to {high}, not {value!r}")
        for name in ("commit_timeout", "commit_resume_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name.replace('_', '-')}: seconds > 0, not {value!r}")
        for name in ("sev_pdh", "sev_plat_cert", "sev_amd_cert"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name.replace('_', '-')}: base64 text, not {getattr(self, name)!r}")

    def qmp(self) -> dict[str, Any]:
        out = {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}
        out.pop("commit-timeout")
        out.pop("commit-resume-timeout")
        return out


@dataclasses.dataclass
class MigrationCapabilities:
    """The migration capabilities this engine implements (QEMU's names with hyphens over QMP).

    QEMU's ``return-path`` is not a switch here: the commit protocol always answers on the return path.
    """

    events: bool = False
    auto_converge: bool = False
    multifd: bool = False

    def qmp(self) -> list[dict[str, Any]]:
        return [
            {"capability": f.name.replace("_", "-"), "state": getattr(self, f.name)} for f in dataclasses.fields(self)
        ]
