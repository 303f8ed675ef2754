"""The migration side of the ``pysev vm`` VMM: QEMU's migration parameters and capabilities as QMP
exposes them (``qapi/migration.json``), the URI forms of ``migrate``/``migrate-incoming``, and the job
that runs one outgoing migration on a thread of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from pysev.firmware import certs
from pysev.hv.machine import VirtualMachine
from pysev.migration import MigrationCapabilities, MigrationParameters
from pysev.migration.outgoing import OutgoingMigration
from pysev.migration.sev_ops import MigrationError, decode_blob
from pysev.migration.tls import AuthzSimple, TlsCredsX509, TlsError
from pysev.migration.transport import MAX_CHANNELS, Connection, parse_tcp, tcp_connect, tcp_resume
from pysev.qmp.commands import generic_error
from pysev.qmp.objects import UserObjects

log = logging.getLogger(__name__)

IN_PROGRESS = frozenset(
    {"setup", "cancelling", "active", "device", "pre-switchover", "wait-unplug", "x-commit-pending"}
)

# qapi/migration.json MigrationCapability (QEMU 8.2), in schema order.
QEMU_CAPABILITIES = (
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "compress",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "block",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
)
ENGINE_CAPABILITIES = {f.name.replace("_", "-") for f in dataclasses.fields(MigrationCapabilities)}
# What the engine implements; every other capability may be set to false only. return-path is always on:
# the commit protocol answers on it.
SUPPORTED_CAPABILITIES = frozenset(ENGINE_CAPABILITIES | {"return-path"})

# migrate-set-parameters: QMP name -> (min, max, QEMU's wording of the range).
PARAM_RANGES: dict[str, tuple[int, int, str]] = {
    "downtime-limit": (0, 2_000_000, "an integer in the range of 0 to 2000000 ms"),
    "max-bandwidth": (0, 18446744073709, "an integer in the range of 0 to 18446744073709 bytes/second"),
    # QEMU allows 1..255; the transport's hello bounds the channels of one migration (the destination
    # refuses more), so the limit is checked here, where the mistake is made.
    "multifd-channels": (1, MAX_CHANNELS, f"a value between 1 and {MAX_CHANNELS}"),
    "throttle-trigger-threshold": (1, 100, "an integer in the range of 1 to 100"),
    "cpu-throttle-initial": (1, 99, "an integer in the range of 1 to 99"),
    "cpu-throttle-increment": (1, 99, "an integer in the range of 1 to 99"),
    "max-cpu-throttle": (1, 99, "an integer in the range of 1 to 99"),
}
PARAM_SCHEMA: dict[str, tuple[Any, bool]] = {
    **{name: ("uint", False) for name in PARAM_RANGES},
    "cpu-throttle-tailslow": ("bool", False),
    "sev-pdh": ("strornull", False),
    "sev-plat-cert": ("strornull", False),
    "sev-amd-cert": ("strornull", False),
    # Names of objects (object-add / -object); "" or null: no TLS (see TlsParameters).
    "tls-creds": ("strornull", False),
    "tls-hostname": ("strornull", False),
    "tls-authz": ("strornull", False),
}
# Parameters a running migration picks up at once (QEMU applies these live too).
LIVE_PARAMS = (
    "downtime_limit",
    "max_bandwidth",
    "throttle_trigger_threshold",
    "cpu_throttle_initial",
    "cpu_throttle_increment",
    "cpu_throttle_tailslow",
    "max_cpu_throttle",
)


@dataclasses.dataclass
class TlsParameters:
    """The migration parameters ``tls-creds`` (a tls-creds-x509 object: TLS on every connection),
    ``tls-hostname`` (source: the name the destination's certificate must match; default: the host of
    the URI) and ``tls-authz`` (destination: an authz object the client certificate's distinguished name
    must satisfy). "" means unset, as QEMU shows it."""

    creds: str = ""
    hostname: str = ""
    authz: str = ""

    def qmp(self) -> dict[str, str]:
        return {"tls-creds": self.creds, "tls-hostname": self.hostname, "tls-authz": self.authz}

    def updated(self, args: dict[str, Any], objects: UserObjects) -> TlsParameters:
        """The parameters after migrate-set-parameters ``args`` (null resets); the objects must exist."""
        new = dataclasses.replace(
            self,
            creds=args.get("tls-creds", self.creds) or "",
            hostname=args.get("tls-hostname", self.hostname) or "",
            authz=args.get("tls-authz", self.authz) or "",
        )
        if new.creds:
            objects.tls_creds(new.creds)
        if new.authz:
            objects.authz(new.authz)
        return new

    def client(self, objects: UserObjects, uri: str) -> TlsCredsX509 | None:
        """The source's credentials for ``migrate`` to ``uri`` (None: no TLS); QEMU's errors."""
        if not self.creds:
            return None
        creds = objects.tls_creds(self.creds)
        try:
            creds.check_endpoint("client")
        except TlsError as err:
            raise generic_error(str(err)) from None
        if not self.hostname and uri[4:].startswith(":"):  # tcp::PORT names no host
            raise generic_error("No hostname available for TLS")
        return creds

    def server(self, objects: UserObjects) -> tuple[TlsCredsX509 | None, AuthzSimple | None]:
        """The destination's credentials and authz object (QEMU ignores tls-authz without TLS)."""
        if not self.creds:
            return None, None
        return objects.tls_creds(self.creds), objects.authz(self.authz) if self.authz else None


class OutgoingJob:
    """One ``migrate``: connecting, then the engine's ``OutgoingMigration`` on a thread of its own."""

    def __init__(
        self,
        vm: VirtualMachine,
        emit: Callable[[str, dict[str, Any]], None],
        uri: str,
        params: MigrationParameters,
        caps: MigrationCapabilities,
        *,
        tls: TlsCredsX509 | None = None,
        tls_hostname: str | None = None,
    ) -> None:
        self.vm = vm
        self._emit = emit
        self.uri = uri
        self.params = params
        self.caps = caps
        self.tls = tls
        self.tls_hostname = tls_hostname
        self.migration: OutgoingMigration | None = None
        self._status = "setup"  # until the engine takes over
        self._error_desc: str | None = None
        self._lock = threading.Lock()
        self._cancelled = False
        self.thread = threading.Thread(target=self._run, name="migration", daemon=True)

    @property
    def status(self) -> str:
        m = self.migration
        if m is not None and m.status != "none":
            return m.status
        return self._status

    @property
    def in_progress(self) -> bool:
        return self.status in IN_PROGRESS

    def info(self) -> dict:
        m = self.migration
        if m is not None and m.status != "none":
            return m.info()
        info = {"status": self._status}
        if self._error_desc:
            info["error-desc"] = self._error_desc
        return info

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            m = self.migration
            if m is None and self._status == "setup":
                self._status = "cancelling"
                self._event("cancelling")
        if m is not None:
            m.cancel()

    def _event(self, status: str) -> None:
        if self.caps.events:
            self._emit("MIGRATION", {"status": status})

    def _end_before_engine(self, status: str, desc: str | None) -> None:
        with self._lock:
            self._status, self._error_desc = status, desc
        self._event(status)

    def _run(self) -> None:
        self._event("setup")
        channels = self.params.multifd_channels if self.caps.multifd else 0
        try:
            conns = tcp_connect(self.uri, channels, tls=self.tls, tls_hostname=self.tls_hostname)
        except (OSError, ValueError) as err:
            log.warning("migration to %s: %s", self.uri, err)
            if self._cancelled:
                self._end_before_engine("cancelled", None)
            else:
                self._end_before_engine("failed", f"Failed to connect to '{self.uri}': {err}")
            return
        m = OutgoingMigration(
            self.vm,
            conns,
            self.params,
            self.caps,
            on_event=self._engine_event,
            resume_connect=self.resume_connect(self.uri),
        )
        with self._lock:
            self.migration = m
            cancelled = self._cancelled
        if cancelled:
            m.cancel()
        m.run()
        log.info(
            "outgoing migration to %s: %s%s", self.uri, m.status.value, f" ({m.error_desc})" if m.error_desc else ""
        )

    def resume_connect(self, uri: str) -> Callable[[bytes], Connection]:
        """Resume connections to ``uri``, in TLS when this migration is (QMP ``migrate resume=true``)."""
        return functools.partial(tcp_resume, uri, tls=self.tls, tls_hostname=self.tls_hostname)

    def _engine_event(self, name: str, data: dict) -> None:
        # The engine announces "setup" again when it starts; the client has seen it already.
        if name == "MIGRATION" and data.get("status") == "setup":
            return
        self._emit(name, data)


def uri_from(args: dict) -> str:
    """The migration URI of a migrate/migrate-incoming command: ``uri`` or QEMU's ``channels`` form."""
    uri: str | None = args.get("uri")
    channels = args.get("channels")
    if uri is not None and channels is not None:
        raise generic_error("need either 'uri' or 'channels' argument")
    if uri is None and channels is None:
        raise generic_error("need either 'uri' or 'channels' argument")
    if channels is not None:
        if len(channels) != 1:
            raise generic_error("Channel list has more than one entries")
        addr = channels[0]["addr"]
        if addr.get("transport") != "socket" or addr.get("type") != "inet":
            raise generic_error(
                "pysev migrates over TCP only: 'addr' must be "
                '{"transport": "socket", "type": "inet", "host": …, "port": …}'
            )
        host, port = addr.get("host"), addr.get("port")
        if not isinstance(host, str) or not isinstance(port, str):
            raise generic_error("Parameter 'addr' needs string members 'host' and 'port'")
        uri = f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
    if uri is None:  # unreachable: one of the two was given
        raise generic_error("need either 'uri' or 'channels' argument")
    scheme = uri.split(":", 1)[0]
    if scheme != "tcp":
        if scheme in ("unix", "exec", "fd", "file", "rdma", "vsock"):
            raise generic_error(f"pysev migrates over tcp: only; '{scheme}:' is not supported")
        raise generic_error(f"unknown migration protocol: {uri}")
    try:
        parse_tcp(uri)
    except ValueError as err:
        raise generic_error(str(err)) from None
    return uri


def check_sev_parameter(name: str, value: str) -> None:
    """sev-pdh / sev-plat-cert / sev-amd-cert, checked when they are set: base64 within QEMU's blob bound,
    and certificates of the right kind (a 2084-byte PDH, PEK ‖ OCA ‖ CEK, ASK ‖ ARK), so that a mistake is
    reported by migrate-set-parameters rather than by SEND_START."""
    try:
        blob = decode_blob(name, value)
        if name == "sev-pdh":
            certs.SevCert.from_bytes(blob)
        elif name == "sev-plat-cert":
            certs.split_plat_certs(blob)
        else:
            certs.split_amd_chain(blob)
    except (MigrationError, certs.CertError, ValueError) as err:
        raise generic_error(f"Parameter '{name}': {err}") from None
