"""SEV live migration: the public Python API.

    >>> from pysev.hv.machine import Host, VirtualMachine
    >>> from pysev.migration import migrate_local
    >>> a, b = Host("a", 2 << 30), Host("b", 2 << 30)
    >>> vm = VirtualMachine(a, 256 << 20)
    >>> result = migrate_local(vm, b)
    >>> result.info["status"], result.verified
    ('completed', True)

Building blocks (``docs/design.md`` walks one migration through them): ``outgoing`` (the source: pre-copy
loop, stop-and-copy, commit), ``incoming`` (the destination), ``channels`` (private pages into stream
records; page channels), ``commit`` (the record digest), ``state`` (status, parameters, capabilities),
``sev_ops`` (everything SEV-specific), ``stream`` (QEMU's wire format), ``transport`` (in-process, TCP,
file).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import threading
import time
from typing import BinaryIO, cast

from pysev.hv.machine import Host, VirtualMachine
from pysev.migration.incoming import IncomingMigration, serve_unknown_resume
from pysev.migration.outgoing import MAX_PASSES, OutgoingMigration
from pysev.migration.sev_ops import MigrationError
from pysev.migration.state import MigrationCapabilities, MigrationParameters, MigrationStatus
from pysev.migration.tls import TlsCredsX509
from pysev.migration.transport import (
    Connection,
    TcpListener,
    TransportError,
    file_reader,
    file_writer,
    inproc_pairs,
    inproc_resume_pair,
    tcp_connect,
    tcp_resume,
)

__all__ = [
    "MigrationCapabilities",
    "MigrationError",
    "MigrationParameters",
    "MigrationResult",
    "MigrationStatus",
    "IncomingMigration",
    "OutgoingMigration",
    "migrate_local",
    "migrate_tcp",
    "receive_tcp",
    "restore_from_file",
    "save_to_file",
    "with_destination_certs",
]


@dataclasses.dataclass
class MigrationResult:
    info: dict  # the source's query-migrate at the end
    destination: VirtualMachine | None
    destination_status: dict
    source_digest: str | None
    destination_digest: str | None
    passes: list[dict]
    #: Both ends, for a commit left pending (``OutgoingMigration.resolve_here``, ``IncomingMigration.resolve``).
    outgoing: OutgoingMigration | None = None
    incoming: IncomingMigration | None = None

    def __enter__(self) -> MigrationResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Destroy the destination VM (its vCPU threads stop, its frames go back to the host)."""
        if self.destination is not None:
            self.destination.close()

    @property
    def verified(self) -> bool:
        """The destination's plaintext and private/shared map equal the source's at switchover."""
        return (
            self.info.get("status") == "completed"
            and self.source_digest is not None
            and self.source_digest == self.destination_digest
        )


def with_destination_certs(params: MigrationParameters, capabilities: dict) -> MigrationParameters:
    """Fill sev-pdh/sev-plat-cert/sev-amd-cert from a destination's query-sev-capabilities."""
    have = {"pdh": params.sev_pdh, "cert-chain": params.sev_plat_cert, "amd-cert-chain": params.sev_amd_cert}
    missing = [k for k, v in have.items() if not v and not isinstance(capabilities.get(k), str)]
    if missing:
        raise ValueError(
            f"destination capabilities lack {', '.join(missing)}: pass the destination's query-sev-capabilities"
        )
    return dataclasses.replace(
        params,
        sev_pdh=params.sev_pdh or capabilities.get("pdh", ""),
        sev_plat_cert=params.sev_plat_cert or capabilities.get("cert-chain", ""),
        sev_amd_cert=params.sev_amd_cert or capabilities.get("amd-cert-chain", ""),
    )


class _Tee(io.RawIOBase):
    """Writes to the transport and to a copy on disk (``--save-stream``)."""

    def __init__(self, inner, copy) -> None:
        self._inner, self._copy = inner, copy

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = self._inner.write(data)
        self._copy.write(data)
        return n

    def write_control(self, data) -> int:
        """The commit protocol's messages: to the transport only (the copy is the QEMU stream)."""
        return self._inner.write(data)

    def close(self) -> None:
        self._copy.close()
        self._inner.close()


def _tee(conns: list[Connection], path: str | None) -> None:
    if not path:
        return
    for i, c in enumerate(conns):
        # _Tee implements the BinaryIO methods the stream writer uses.
        c.wfile = cast(BinaryIO, _Tee(c.output, open(path if i == 0 else f"{path}.ch{i}", "wb")))


def migrate_local(
    source: VirtualMachine,
    destination_host: Host,
    *,
    params: MigrationParameters | None = None,
    caps: MigrationCapabilities | None = None,
    channels: int = 0,
    verify: bool = True,
    save_stream: str | None = None,
    on_pass=None,
    on_progress=None,
    timeout: float | None = None,
    max_passes: int | None = None,
) -> MigrationResult:
    """Migrate ``source`` to a new VM on ``destination_host``, both in this process (socketpairs).

    Blocks until the migration ends: ``timeout`` seconds cancel it (the source keeps running), and
    ``max_passes`` bounds the pre-copy passes (a guest that never converges fails instead of looping).
    Use the result as a context manager (or call ``close()``) to destroy the destination VM."""
    params = with_destination_certs(params or MigrationParameters(), destination_host.sev_capabilities())
    dest = VirtualMachine(
        destination_host,
        source.memory.ram.used_length,
        sev=source.sev_enabled,
        policy=source.policy,
        incoming=True,
        **source.workload_args(),
    )
    src_conns, dst_conns = inproc_pairs(channels)
    _tee(src_conns, save_stream)
    incoming = IncomingMigration(dest, dst_conns, commit_timeout=params.commit_timeout, verify=verify)
    thread = threading.Thread(target=incoming.run, name="mig-incoming", daemon=True)
    thread.start()

    def resume_connect(migration_id: bytes) -> Connection:
        src_end, dst_end = inproc_resume_pair(migration_id)
        threading.Thread(target=incoming.serve_resume, args=(dst_end,), name="mig-resume", daemon=True).start()
        return src_end

    outgoing = OutgoingMigration(
        source,
        src_conns,
        params,
        caps,
        on_pass=on_pass,
        on_progress=on_progress,
        verify=verify,
        resume_connect=resume_connect,
        max_passes=max_passes if max_passes is not None else MAX_PASSES,
    )
    timer = threading.Timer(timeout, outgoing.cancel) if timeout is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        info = outgoing.run()
    finally:
        if timer is not None:
            timer.cancel()
    thread.join(params.commit_timeout + 10)
    dest_status = {
        "status": incoming.status.value,
        **({"error-desc": incoming.error_desc} if incoming.error_desc else {}),
    }
    received: VirtualMachine | None = dest
    if incoming.status == MigrationStatus.FAILED:
        dest.destroy()
        received = None
    return MigrationResult(
        info,
        received,
        dest_status,
        outgoing.digest_at_switchover,
        incoming.guest_digest,
        outgoing.passes,
        outgoing,
        incoming,
    )


def migrate_tcp(
    source: VirtualMachine,
    uri: str,
    capabilities: dict,
    *,
    params: MigrationParameters | None = None,
    caps: MigrationCapabilities | None = None,
    channels: int = 0,
    verify: bool = True,
    save_stream: str | None = None,
    on_pass=None,
    on_progress=None,
    tls: TlsCredsX509 | None = None,
    tls_hostname: str | None = None,
) -> OutgoingMigration:
    """The source side of a migration to a ``pysev`` destination listening at ``tcp:HOST:PORT``. With
    ``tls`` (client credentials, ``pysev.migration.tls``) every connection, resume ones included, is TLS
    and the destination's certificate must match ``tls_hostname`` (default: the host of ``uri``)."""
    params = with_destination_certs(params or MigrationParameters(), capabilities)
    conns = tcp_connect(uri, channels, tls=tls, tls_hostname=tls_hostname)
    _tee(conns, save_stream)
    outgoing = OutgoingMigration(
        source,
        conns,
        params,
        caps,
        on_pass=on_pass,
        on_progress=on_progress,
        verify=verify,
        resume_connect=functools.partial(tcp_resume, uri, tls=tls, tls_hostname=tls_hostname),
    )
    outgoing.run()
    return outgoing


def receive_tcp(
    listener: TcpListener,
    dest: VirtualMachine,
    *,
    verify: bool = True,
    commit_timeout: float = 60.0,
    timeout: float | None = None,
    resume_wait: float | None = None,
) -> IncomingMigration:
    """The destination side: accept one migration on ``listener`` (``TcpListener(uri, tls=…)`` for TLS)
    into ``dest`` (an incoming VM). When the source's decision does not arrive on the migration
    connection, keep serving resume connections until it does (at most ``resume_wait`` seconds; None: as
    long as it takes); new migrations are refused."""
    conns = listener.accept(timeout=timeout)
    while conns[0].resume:  # a resume for some earlier migration: not ours
        serve_unknown_resume(conns[0])
        conns = listener.accept(timeout=timeout)
    incoming = IncomingMigration(dest, conns, commit_timeout=commit_timeout, verify=verify)
    incoming.run()
    deadline = None if resume_wait is None else time.monotonic() + resume_wait
    while incoming.status == MigrationStatus.COMMIT_PENDING:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        try:
            conns = listener.accept(timeout=left)
        except (OSError, TransportError):
            continue
        if conns[0].resume:
            incoming.serve_resume(conns[0])
        else:
            for conn in conns:  # a guest is waiting for its decision here: no other migration
                conn.close()
    # Answer a source that delivers its decision again (its DONE was lost) for as long as the listener lives.
    threading.Thread(target=_answer_resumes, args=(listener, incoming), name="mig-resumes", daemon=True).start()
    return incoming


def _answer_resumes(listener: TcpListener, incoming: IncomingMigration) -> None:
    while True:
        try:
            conns = listener.accept(timeout=None)
        except (TransportError, TimeoutError):
            continue  # one bad or silent client
        except OSError:
            return  # the listener was closed
        if conns[0].resume:
            incoming.serve_resume(conns[0])
        else:
            for conn in conns:
                conn.close()


def save_to_file(
    source: VirtualMachine,
    path: str,
    *,
    params: MigrationParameters,
    verify: bool = True,
    on_pass=None,
    on_progress=None,
) -> OutgoingMigration:
    """Migrate ``source`` into a file (save now, restore later). ``params`` name the host that will
    restore it (its certificates authenticate the target, as for a network migration)."""
    outgoing = OutgoingMigration(
        source, [file_writer(path)], params, on_pass=on_pass, on_progress=on_progress, file_mode=True, verify=verify
    )
    outgoing.run()
    return outgoing


def restore_from_file(
    host: Host, path: str, memory_size: int, *, sev: bool = True, verify: bool = True, **vm_args
) -> tuple[VirtualMachine | None, IncomingMigration]:
    """Restore a VM saved with ``save_to_file`` on ``host`` (its firmware must be the one the file
    was sealed for: RECEIVE_START fails with BAD_MEASUREMENT otherwise)."""
    dest = VirtualMachine(host, memory_size, sev=sev, incoming=True, **vm_args)
    incoming = IncomingMigration(dest, [file_reader(path)], file_mode=True, verify=verify)
    incoming.run()
    if incoming.status != MigrationStatus.COMPLETED:
        dest.destroy()
        return None, incoming
    return dest, incoming
