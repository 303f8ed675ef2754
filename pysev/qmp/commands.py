"""QMP commands: the error reply, argument schemas checked with QEMU's messages (``qapi/qobject-input-visitor.c``)
before a handler runs, the command table, and the commands every QMP server has (``qmp_capabilities``,
``query-commands``, ``query-version``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pysev.qmp.server import QmpServer


class QmpError(Exception):
    """A QMP error reply: ``{"error": {"class": class_, "desc": desc}}``. Handlers raise it."""

    def __init__(self, class_: str, desc: str) -> None:
        super().__init__(f"{class_}: {desc}")
        self.class_ = class_
        self.desc = desc

    def to_json(self) -> dict:
        return {"class": self.class_, "desc": self.desc}


def generic_error(desc: str) -> QmpError:
    """The GenericError class that most QEMU commands raise."""
    return QmpError("GenericError", desc)


# ---------------------------------------------------------------------------------------------------------
# Commands and their argument schemas (QEMU qapi/qobject-input-visitor.c messages)
# ---------------------------------------------------------------------------------------------------------


class ArgEnum:
    """An enum argument type: a string that must be one of ``values`` (QAPI ``enum``)."""

    def __init__(self, *values: str) -> None:
        if not values or not all(isinstance(v, str) for v in values):
            raise ValueError("ArgEnum needs at least one string value")
        self.values = tuple(values)

    def __repr__(self) -> str:
        return f"ArgEnum{self.values!r}"


_INT64 = (-(1 << 63), (1 << 63) - 1)
_UINT64 = (0, (1 << 64) - 1)

# name -> (predicate, QEMU's word for the type in "expected: …")
_SCALARS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "string"),
    "int": (lambda v: type(v) is int and _INT64[0] <= v <= _INT64[1], "integer"),
    "uint": (lambda v: type(v) is int and _UINT64[0] <= v <= _UINT64[1], "uint64"),
    "number": (lambda v: type(v) in (int, float), "number"),
    "bool": (lambda v: isinstance(v, bool), "boolean"),
    "object": (lambda v: isinstance(v, dict), "object"),
    "array": (lambda v: isinstance(v, list), "array"),
    "strornull": (lambda v: v is None or isinstance(v, str), "StrOrNull"),
    "any": (lambda v: True, "any"),
}

#: A type is a scalar name from ``_SCALARS``, an :class:`ArgEnum`, ``[T]`` (array of T) or a nested schema
#: ``{member: (T, required)}`` (a QAPI struct).
TypeSpec = Any
Schema = Mapping[str, "tuple[TypeSpec, bool]"]


def _check_typespec(spec: TypeSpec, where: str) -> None:
    if isinstance(spec, str):
        if spec not in _SCALARS:
            raise ValueError(f"{where}: unknown argument type {spec!r} (known: {', '.join(_SCALARS)})")
    elif isinstance(spec, ArgEnum):
        pass
    elif isinstance(spec, list):
        if len(spec) != 1:
            raise ValueError(f"{where}: an array type is written [element_type]")
        _check_typespec(spec[0], where + "[]")
    elif isinstance(spec, Mapping):
        _check_schema(spec, where)
    else:
        raise ValueError(f"{where}: bad argument type {spec!r}")


def _check_schema(schema: Schema, where: str) -> None:
    for name, entry in schema.items():
        if not isinstance(name, str) or not (
            isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], bool)
        ):
            raise ValueError(f"{where}: schema entries are name -> (type, required), got {name!r}: {entry!r}")
        _check_typespec(entry[0], f"{where}.{name}")


def _validate_struct(schema: Schema, value: dict, prefix: str) -> None:
    """Check ``value`` against ``schema`` in schema order, then reject unknown members (as QEMU's visitor)."""
    for name, (spec, required) in schema.items():
        full = prefix + name
        if name in value:
            _validate_value(spec, value[name], full)
        elif required:
            raise generic_error(f"Parameter '{full}' is missing")
    for name in value:
        if name not in schema:
            raise generic_error(f"Parameter '{prefix}{name}' is unexpected")


def _validate_value(spec: TypeSpec, value: Any, full: str) -> None:
    if isinstance(spec, str):
        ok, word = _SCALARS[spec]
        if not ok(value):
            if spec == "uint":  # QEMU's uint64 visitor words its error differently
                raise generic_error(f"Parameter '{full}' expects uint64")
            raise generic_error(f"Invalid parameter type for '{full}', expected: {word}")
    elif isinstance(spec, ArgEnum):
        if not isinstance(value, str):
            raise generic_error(f"Invalid parameter type for '{full}', expected: string")
        if value not in spec.values:
            raise generic_error(f"Parameter '{full}' does not accept value '{value}'")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise generic_error(f"Invalid parameter type for '{full}', expected: array")
        for k, item in enumerate(value):
            _validate_value(spec[0], item, f"{full}[{k}]")
    else:
        if not isinstance(value, dict):
            raise generic_error(f"Invalid parameter type for '{full}', expected: object")
        _validate_struct(spec, value, full + ".")


Handler = Callable[[dict, "Session"], Any]


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    args: Schema
    allow_in_negotiation: bool = False
    # Built-ins that only read server state run on the event loop; everything else on a worker thread.
    inline: bool = False

    def validate(self, args: dict) -> None:
        _validate_struct(self.args, args, "")


class CommandTable:
    """The QMP commands a server offers, with their argument schemas.

    ``qmp_capabilities``, ``query-commands`` and ``query-version`` are built in. Register the rest with
    :meth:`register` or the :meth:`command` decorator; registration is thread-safe and may happen while a
    server is running.
    """

    BUILTINS = ("qmp_capabilities", "query-commands", "query-version")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._commands: dict[str, Command] = {}
        self._add(
            Command(
                "qmp_capabilities",
                _qmp_capabilities,
                {"enable": ([ArgEnum("oob")], False)},
                allow_in_negotiation=True,
                inline=True,
            )
        )
        self._add(Command("query-commands", _query_commands, {}, inline=True))
        self._add(Command("query-version", _query_version, {}, inline=True))

    def _add(self, cmd: Command) -> None:
        with self._lock:
            if cmd.name in self._commands:
                raise ValueError(f"QMP command {cmd.name!r} is already registered")
            self._commands[cmd.name] = cmd

    def register(self, name: str, handler: Handler, args: Schema | None = None) -> Command:
        """Add command ``name``: ``handler(args, session)`` returns the ``"return"`` value (None means ``{}``)
        or raises :class:`QmpError`. ``args`` maps each argument to ``(type, required)``."""
        if not isinstance(name, str) or not name:
            raise ValueError("a QMP command name is a non-empty string")
        if not callable(handler):
            raise TypeError(f"handler for {name!r} is not callable")
        schema = dict(args or {})
        _check_schema(schema, name)
        cmd = Command(name, handler, schema)
        self._add(cmd)
        return cmd

    def command(self, name: str, args: Schema | None = None) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`register`."""

        def deco(fn: Handler) -> Handler:
            self.register(name, fn, args)
            return fn

        return deco

    def get(self, name: str) -> Command | None:
        return self._commands.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._commands)

    def __contains__(self, name: object) -> bool:
        return name in self._commands


def _qmp_capabilities(args: dict, session: Session) -> dict:
    if session.negotiated:
        raise QmpError("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
    for cap in args.get("enable", []):
        # The greeting offers no capability (no out-of-band execution), so none can be enabled.
        raise generic_error(f"Capability {cap} not available")
    return {}


def _query_commands(args: dict, session: Session) -> list:
    return [{"name": name} for name in session.server.commands.names()]


def _query_version(args: dict, session: Session) -> dict:
    return session.server.version_info()


@dataclass(eq=False)
class Session:
    """One connected client, as handlers see it."""

    id: int
    peer: str
    server: QmpServer
    negotiated: bool = False
    writer: asyncio.StreamWriter | None = field(default=None, repr=False)
