"""The PSP mailbox: the one choke point every firmware command set is issued through.

A command set (SEV in ``pysev.firmware.sev``; SEV-SNP can sit beside it) subclasses :class:`Mailbox`
with four tables (its command-id enum, its state table of :class:`CommandSpec` rows, its
:class:`CommandBuffer` layouts, its status enum) and one ``_cmd_<name>`` handler per command.
:meth:`Mailbox.issue` then runs every command the same way, as AMD's dispatcher does
(``sev_dispatch.c`` ``sev_dispatch_master``, with the state tables of ``sev_plat.c`` and
``sev_guest.c``): an unknown id is INVALID_COMMAND, a platform state outside the command's row is
INVALID_PLATFORM_STATE, and only then does the handler run its own checks, under the firmware lock.
A handler ends early by raising :class:`CommandRefusedError`; guest-state checks and transitions read the
same table. A refused command changes nothing: handlers validate everything before their first write.

Command buffers are little-endian packed layouts in host memory (Linux ``include/linux/psp-sev.h``
``sev_data_*``; AMD ``sev_mcmd.h``); :meth:`Mailbox.issue_mailbox` reads one from its host physical
address and writes it back only as AMD's dispatcher does: each command has a :class:`WriteBack` mode
(``sev_dispatch.c`` ``master_handler_table``, ``CMD_BUF_*``), and the buffer goes back whole, reserved
bytes as they came in.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import logging
import struct
import threading
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, TypeVar

from pysev.hw.hostmem import HostMemory

log = logging.getLogger(__name__)

BufferFormat = tuple[tuple[str | None, str], ...]
_Buf = TypeVar("_Buf", bound="CommandBuffer")


@dataclasses.dataclass
class CommandBuffer:
    """Base of every command buffer: ``FORMAT`` lists the fields in memory order, ``None`` = reserved.

    A buffer is a dataclass subclass that sets ``FORMAT`` and annotates each named field as ``int = 0``,
    in ``FORMAT``'s order (so the constructor and the attributes are visible to a type checker)::

        @dataclasses.dataclass
        class InitBuf(CommandBuffer):
            FORMAT = (("flags", "I"), (None, "I"), ("tmr_address", "Q"), ("tmr_len", "I"))
            flags: int = 0
            tmr_address: int = 0
            tmr_len: int = 0

    Defining the class checks that the two agree (names and order) and that ``FORMAT`` is a valid
    struct layout, so they cannot drift.
    """

    FORMAT: ClassVar[BufferFormat] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        named = tuple(name for name, _ in cls.FORMAT if name)
        annotations = inspect.get_annotations(cls)
        if tuple(annotations) != named:
            raise TypeError(f"{cls.__name__}: fields {tuple(annotations)} do not match its FORMAT's {named}")
        if any(hint not in ("int", int) for hint in annotations.values()):
            raise TypeError(f"{cls.__name__}: every field is an int, got {annotations}")
        cls.layout()  # a bad struct code fails here, at import

    @classmethod
    def layout(cls) -> struct.Struct:
        return struct.Struct("<" + "".join(code for _, code in cls.FORMAT))

    @classmethod
    def size(cls) -> int:
        return cls.layout().size

    @classmethod
    def offsets(cls) -> dict[str, int]:
        out, off = {}, 0
        for name, code in cls.FORMAT:
            if name:
                out[name] = off
            off += struct.calcsize("<" + code)
        return out

    def pack(self) -> bytes:
        return self.layout().pack(*(getattr(self, n) if n else 0 for n, _ in self.FORMAT))

    def pack_over(self, original: bytes) -> bytes:
        """The buffer's named fields packed over ``original``: reserved bytes keep their original values."""
        out = bytearray(original[: self.size()])
        packed = self.pack()
        off = 0
        for name, code in self.FORMAT:
            n = struct.calcsize("<" + code)
            if name:
                out[off : off + n] = packed[off : off + n]
            off += n
        return bytes(out)

    @classmethod
    def unpack(cls: type[_Buf], data: bytes) -> _Buf:
        values = cls.layout().unpack(bytes(data[: cls.size()]))
        return cls(**{n: v for (n, _), v in zip(cls.FORMAT, values, strict=True) if n})


class WriteBack(enum.Enum):
    """When the mailbox copies a command buffer back to host memory (AMD ``sev_dispatch.c``
    ``sev_dispatch_master``, the ``CMD_BUF_*`` column of ``master_handler_table``)."""

    NEVER = "input only"  # CMD_BUF_INPUT_ONLY / CMD_BUF_IGNORE
    ON_SUCCESS = "input and output"  # CMD_BUF_INPUT_AND_OUTPUT: reserved bytes as the host wrote them
    OUTPUT_ONLY = "output only"  # CMD_BUF_OUTPUT_ONLY: the whole buffer, reserved bytes zero
    ON_SUCCESS_OR_LENGTH = "input and output, also on INVALID_LENGTH"  # CMD_BUF_INPUT_AND_OUTPUT_ERROR


@dataclasses.dataclass(frozen=True)
class CommandSpec:
    """One row of a command set's state table: where a command may run, where it leads, and what the
    mailbox writes back.

    ``platform_gate`` False: the handler checks the platform state itself, at the point where AMD's handler
    does (e.g. after a length check); the mailbox then does not check it first.
    """

    platform: frozenset[enum.IntEnum]  # platform states (INVALID_PLATFORM_STATE otherwise)
    guest: frozenset[enum.IntEnum] | None = None  # required guest states (INVALID_GUEST_STATE otherwise)
    to: enum.IntEnum | None = None  # guest state after success
    write_back: WriteBack = WriteBack.NEVER
    platform_gate: bool = True


class CommandRefusedError(Exception):
    """A handler's early exit with a firmware status (of the command set's status enum);
    :meth:`Mailbox.issue` returns the status."""

    def __init__(self, status: Any) -> None:
        self.status = status


class MailboxStatuses(Protocol):
    """The statuses the mailbox itself returns: every command set's status enum has these members."""

    # Read-only members, as an enum's are (hence properties, named as the members).
    @property
    def INVALID_COMMAND(self) -> enum.IntEnum: ...  # noqa: N802

    @property
    def INVALID_PLATFORM_STATE(self) -> enum.IntEnum: ...  # noqa: N802

    @property
    def INVALID_GUEST(self) -> enum.IntEnum: ...  # noqa: N802

    @property
    def INVALID_GUEST_STATE(self) -> enum.IntEnum: ...  # noqa: N802

    @property
    def INVALID_ADDRESS(self) -> enum.IntEnum: ...  # noqa: N802

    @property
    def INVALID_LENGTH(self) -> enum.IntEnum: ...  # noqa: N802


class GuestRecord(Protocol):
    """What the mailbox needs of a command set's guest: its handle and its state."""

    handle: int
    state: Any


class Mailbox:
    """The mailbox of one command set on one simulated host; subclasses fill in the four tables.

    ``dram`` is the host's physical memory: command buffers and the data they point to live there,
    addressed by host physical address. ``_guests`` maps a guest handle to the command set's guest
    record; every command runs under ``_lock``.
    """

    command_ids: ClassVar[type[enum.IntEnum]]
    state_table: ClassVar[Mapping[Any, CommandSpec]]
    buffers: ClassVar[Mapping[Any, type[CommandBuffer] | None]]
    statuses: ClassVar[MailboxStatuses]

    def __init__(self, dram: HostMemory, state: enum.IntEnum) -> None:
        self.dram = dram
        self.state = state
        self._lock = threading.RLock()
        self._guests: dict[int, Any] = {}

    # -- the choke point ---------------------------------------------------------------------------
    def issue(self, cmd: int, buf: CommandBuffer | None = None) -> Any:
        """Run one firmware command on its command buffer; output fields reach ``buf`` when the command's
        :class:`WriteBack` mode allows (on SUCCESS; for length queries also on INVALID_LENGTH)."""
        with self._lock:
            try:
                cmd = self.command_ids(cmd)
            except ValueError:
                return self.statuses.INVALID_COMMAND
            expected = self.buffers[cmd]
            if expected is not None and not isinstance(buf, expected):
                raise TypeError(f"{cmd.name} takes a {expected.__name__}, got {type(buf).__name__}")
            # The handler works on a private copy, as AMD's dispatcher copies the buffer into PSP memory;
            # its output reaches ``buf`` only when the command's write-back mode says so.
            work = dataclasses.replace(buf) if buf is not None else None
            try:
                if self.state_table[cmd].platform_gate:
                    self._require_platform_state(cmd)
                status = getattr(self, f"_cmd_{cmd.name.lower()}")(work)
            except CommandRefusedError as refused:
                status = refused.status
            if buf is not None and work is not None and self._writes_back(cmd, status):
                for field in dataclasses.fields(work):
                    setattr(buf, field.name, getattr(work, field.name))
            log.debug("%s -> %s (platform %s)", cmd.name, status.name, self.state.name)
            return status

    def issue_mailbox(self, cmd: int, cmd_paddr: int) -> Any:
        """The PSP mailbox form: the command buffer is read from host memory and written back according to
        the command's :class:`WriteBack` mode, named fields only (reserved bytes keep what the host wrote)."""
        try:
            cmd = self.command_ids(cmd)
        except ValueError:
            return self.statuses.INVALID_COMMAND
        layout = self.buffers[cmd]
        if layout is None:
            return self.issue(cmd)
        if not self.dram.contains(cmd_paddr, layout.size()):
            return self.statuses.INVALID_ADDRESS
        raw = self.dram.read(cmd_paddr, layout.size())
        buf = layout.unpack(raw)
        status = self.issue(cmd, buf)
        if self._writes_back(cmd, status):
            out = buf.pack() if self.state_table[cmd].write_back == WriteBack.OUTPUT_ONLY else buf.pack_over(raw)
            self.dram.write(cmd_paddr, out)
        return status

    def _writes_back(self, cmd: enum.IntEnum, status: Any) -> bool:
        mode = self.state_table[cmd].write_back
        if mode == WriteBack.NEVER:
            return False
        if status == 0:
            return True
        return mode == WriteBack.ON_SUCCESS_OR_LENGTH and status == self.statuses.INVALID_LENGTH

    # -- checks and transitions from the state table ----------------------------------------------------
    def _require_platform_state(self, cmd: enum.IntEnum) -> None:
        if self.state not in self.state_table[cmd].platform:
            raise CommandRefusedError(self.statuses.INVALID_PLATFORM_STATE)

    def _guest(self, handle: int) -> Any:
        guest = self._guests.get(handle)
        if guest is None:
            raise CommandRefusedError(self.statuses.INVALID_GUEST)
        return guest

    def _require_guest_state(self, guest: GuestRecord, cmd: enum.IntEnum) -> None:
        allowed = self.state_table[cmd].guest
        assert allowed is not None, f"{cmd.name} names no guest states in the state table"
        if guest.state not in allowed:
            raise CommandRefusedError(self.statuses.INVALID_GUEST_STATE)

    def _transition(self, guest: GuestRecord, cmd: enum.IntEnum) -> None:
        to = self.state_table[cmd].to
        assert to is not None, f"{cmd.name} names no guest transition in the state table"
        log.info("guest %d: %s -> %s (%s)", guest.handle, guest.state.name, to.name, cmd.name)
        guest.state = to

    # -- host memory as the firmware reaches it ----------------------------------------------------------
    def _read(self, paddr: int, length: int) -> bytes:
        if not self.dram.contains(paddr, length):
            raise CommandRefusedError(self.statuses.INVALID_ADDRESS)
        return self.dram.read(paddr, length)

    def _check_writable(self, *ranges: tuple[int, int]) -> None:
        for paddr, length in ranges:
            if not self.dram.contains(paddr, length):
                raise CommandRefusedError(self.statuses.INVALID_ADDRESS)
