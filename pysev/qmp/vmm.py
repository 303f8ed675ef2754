"""The ``pysev vm`` VMM: one simulated host running one SEV guest, driven over QMP
(QEMU's ``qapi/migration.json``, ``qapi/misc-target.json``).

The lifecycle is QEMU's: a source boots its guest and runs it; ``migrate`` returns ``{}`` at once and the
engine (``pysev.migration.outgoing``) runs on a thread of its own; after a completed migration the source
is in ``postmigrate``, after a failed or cancelled one it runs again (the engine's SEND_CANCEL path) and
can ``migrate`` again. A destination (``--incoming tcp:HOST:PORT``, or ``defer`` + ``migrate-incoming``)
waits in ``inmigrate`` and runs the guest once the source commits; a failed incoming migration leaves it
waiting in ``inmigrate`` with a fresh, empty guest, still listening, and ready for ``migrate-incoming``.

Commands, argument schemas, error classes and messages follow QEMU where QEMU has them; the extension
``x-guest-digest`` (and ``x-guest-digest`` in query-migrate, taken at switchover) lets a client verify
that the destination's plaintext equals the source's, through the firmware's debug path. TLS migration
is QEMU's: ``object-add`` a ``tls-creds-x509`` (and an ``authz-simple``), then the migration parameters
``tls-creds``, ``tls-hostname``, ``tls-authz`` (``pysev.qmp.objects``, ``pysev.migration.tls``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pysev import kvm
from pysev.firmware.sev.abi import Cmd, GuestState, PlatformStatusBuf, Policy
from pysev.hv.machine import DEFAULT_POLICY, Host, RunState, VirtualMachine
from pysev.migration import MigrationCapabilities, MigrationParameters, MigrationStatus
from pysev.migration.incoming import IncomingMigration, serve_unknown_resume
from pysev.migration.outgoing import OutgoingMigration
from pysev.migration.sev_ops import MigrationError
from pysev.migration.tls import TlsError
from pysev.migration.transport import Connection, TcpListener, parse_tcp
from pysev.qmp.commands import ArgEnum, CommandTable, Session, generic_error
from pysev.qmp.framing import DEFAULT_MAX_MESSAGE
from pysev.qmp.machine_info import DirtyRateMeter, cpus_fast, vm_uuid
from pysev.qmp.migration_jobs import (
    ENGINE_CAPABILITIES,
    LIVE_PARAMS,
    PARAM_RANGES,
    PARAM_SCHEMA,
    QEMU_CAPABILITIES,
    SUPPORTED_CAPABILITIES,
    OutgoingJob,
    TlsParameters,
    check_sev_parameter,
    uri_from,
)
from pysev.qmp.objects import UserObjects
from pysev.qmp.objects import register_commands as register_object_commands
from pysev.qmp.server import QmpServer

__all__ = ["Vmm", "HOST_OVERHEAD"]

log = logging.getLogger(__name__)

#: Host DRAM beyond the guest's RAM: firmware and kernel buffers, bounce pages.
HOST_OVERHEAD = 512 << 20

# QEMU's SevState (qapi/misc-target.json) by firmware guest state; SENT has no QEMU name.
_SEV_STATE = {
    GuestState.UNINIT: "uninit",
    GuestState.LUPDATE: "launch-update",
    GuestState.LSECRET: "launch-secret",
    GuestState.RUNNING: "running",
    GuestState.SUPDATE: "send-update",
    GuestState.RUPDATE: "receive-update",
    GuestState.SENT: "sent",
}


class Vmm:
    """One host, one guest, one QMP monitor. ``incoming`` is None, ``"defer"`` or ``"tcp:HOST:PORT"``."""

    def __init__(
        self,
        memory: int,
        *,
        sev: bool = True,
        policy: int = DEFAULT_POLICY,
        incoming: str | None = None,
        dirty_rate: float = 0.0,
        workload: str = "uniform",
        convert_rate: float = 0.0,
        vga_fps: float = 0.0,
        seed: int | None = None,
        name: str = "pysev-vm",
        host_memory: int | None = None,
        max_message: int | None = None,
        objects: UserObjects | None = None,
    ) -> None:
        if incoming is not None and incoming != "defer":
            parse_tcp(incoming)  # ValueError names the problem
        self.memory = memory
        self.host = Host(name, host_memory or memory + HOST_OVERHEAD)
        self._vm_args: dict[str, Any] = dict(
            sev=sev,
            policy=policy,
            dirty_rate=dirty_rate,
            workload=workload,
            convert_rate=convert_rate,
            vga_fps=vga_fps,
            seed=seed,
        )
        self.params = MigrationParameters()
        self.caps = MigrationCapabilities()
        self.objects = objects or UserObjects()  # -object / object-add: TLS credentials, authz
        self.tls = TlsParameters()
        self._lock = threading.RLock()
        self._closing = False
        self._shutdown_requested = threading.Event()
        self._shutdown_reason = "host-signal"
        self._outgoing: OutgoingJob | None = None
        # Incoming side: the command-line setting, the listener and its thread, and the last attempt.
        self.incoming_setting = incoming
        self._listener: TcpListener | None = None
        self._incoming: IncomingMigration | None = None
        self._incoming_status: str | None = None  # None until listening; setup/active/completed/failed
        self._incoming_error: str | None = None
        self._incoming_threads: list[threading.Thread] = []
        self._autostart = True
        self.vm = self._new_vm(incoming=incoming is not None)
        if incoming is None:
            self.vm.boot_fill()  # every page holds known plaintext, so digests mean something
        self.dirty_rate = DirtyRateMeter()
        self.table = self._build_table()
        self.server = QmpServer(self.table, max_message=max_message or DEFAULT_MAX_MESSAGE)

    # -- process lifecycle -----------------------------------------------------------------------------
    def start(self, qmp_address: str) -> dict:
        """Listen for QMP (and for the incoming migration); return the real addresses."""
        if self.incoming_setting not in (None, "defer"):
            self._listen(self.incoming_setting)
        address = self.server.run_in_thread(qmp_address)
        log.info("VMM up: QMP %s, guest %s", address, self.vm.state.value)
        return {"qmp": address, "incoming": self.incoming_uri}

    @property
    def incoming_uri(self) -> str | None:
        listener = self._listener
        if listener is not None:
            return listener.uri
        return self.incoming_setting

    def request_shutdown(self, reason: str) -> None:
        """quit (``host-qmp-quit``) or a signal (``host-signal``); the main thread does the rest."""
        if not self._shutdown_requested.is_set():
            self._shutdown_reason = reason
            self._shutdown_requested.set()

    def wait(self) -> None:
        """Block (in the main thread, so signals are served) until shutdown is requested, then shut down."""
        while not self._shutdown_requested.wait(0.2):
            pass
        self.shutdown()

    def shutdown(self) -> None:
        """SHUTDOWN event, stop the migration threads, destroy the guest, close the monitor."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        log.info("shutting down (%s)", self._shutdown_reason)
        self.server.emit_event("SHUTDOWN", {"guest": False, "reason": self._shutdown_reason})
        job = self._outgoing
        if job is not None and job.in_progress:
            job.cancel()
            job.thread.join(15)
        self._close_listener()
        incoming = self._incoming
        if incoming is not None and incoming.status == "active":
            incoming.fail(MigrationError("the destination VMM is shutting down"))
        for t in self._incoming_threads:
            t.join(15)
        try:
            self.vm.destroy()
        except Exception:  # noqa: BLE001 — a failed vCPU must not keep the process alive
            log.exception("destroying the guest failed")
        time.sleep(0.1)  # let the last replies and the SHUTDOWN event reach the clients
        self.server.stop()

    # -- guest ----------------------------------------------------------------------------------------
    def _new_vm(self, *, incoming: bool) -> VirtualMachine:
        vm = VirtualMachine(self.host, self.memory, incoming=incoming, **self._vm_args)
        vm.state_listeners.append(self._on_state)
        return vm

    def emit(self, name: str, data: dict | None = None) -> None:
        if not self._closing:
            self.server.emit_event(name, data)

    def _on_state(self, old: RunState, new: RunState) -> None:
        # QEMU: STOP from vm_stop, RESUME from vm_start; none at process exit.
        if old == RunState.RUNNING and new != RunState.RUNNING and new != RunState.SHUTDOWN:
            self.emit("STOP")
        elif new == RunState.RUNNING and old != RunState.RUNNING:
            self.emit("RESUME")

    def _check_alive(self) -> None:
        if self._closing:
            raise generic_error("The VMM is shutting down")

    # -- incoming -------------------------------------------------------------------------------------
    def _listen(self, uri: str) -> None:
        try:
            tls, authz = self.tls.server(self.objects)
            listener = TcpListener(uri, tls=tls, tls_authz=authz)
        except ValueError as err:  # incl. TlsError
            raise generic_error(str(err)) from None
        except OSError as err:
            raise generic_error(f"Failed to bind socket for '{uri}': {err.strerror or err}") from None
        with self._lock:
            self._listener = listener
            self._incoming_status = "setup"
            self._incoming_error = None
        t = threading.Thread(target=self._accept_loop, args=(listener,), name="migration-incoming", daemon=True)
        self._incoming_threads = [x for x in self._incoming_threads if x.is_alive()] + [t]
        t.start()
        log.info("waiting for an incoming migration on %s%s", listener.uri, " (TLS)" if tls else "")

    def _waiting_listener(self) -> TcpListener | None:
        """The listener while it waits for a migration (its TLS follows the parameters until one arrives)."""
        with self._lock:
            waiting = self._incoming_status in ("setup", "failed")
            return self._listener if waiting else None

    def _close_listener(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def _accept_loop(self, listener: TcpListener) -> None:
        """Accept migrations on ``listener``; after a failure, start over with an empty guest (QEMU would
        exit; a VMM under test is more useful alive). Resume connections deliver a source's decision for
        the guest waiting here (``x-commit-pending``), or for one already resolved (answered again). While
        a guest waits for its decision, or runs after a completed migration, no other migration is taken."""
        while True:
            try:
                conns = listener.accept(timeout=None)
            except OSError as err:
                if self._closing or self._listener is not listener:
                    return
                log.warning("incoming migration on %s: %s", listener.uri, err)
                time.sleep(0.05)
                continue
            if conns[0].resume:
                self._serve_resume(conns[0])
                continue
            with self._lock:
                if self._closing or self._listener is not listener:
                    for c in conns:
                        c.close()
                    return
                holding = self._incoming is not None and self._incoming.status in (
                    MigrationStatus.COMMIT_PENDING,
                    MigrationStatus.COMPLETED,
                )
                if holding:
                    log.warning("incoming migration refused: a guest is already here (%s)", self._incoming_status)
                    for c in conns:
                        c.close()
                    continue
                incoming = IncomingMigration(
                    self.vm,
                    conns,
                    commit_timeout=self.params.commit_timeout,
                    on_event=self._incoming_event,
                    verify=True,
                )
                self._incoming = incoming
                self._incoming_status = "active"
                self._incoming_error = None
            if self.caps.events:
                self.emit("MIGRATION", {"status": "active"})
            incoming.run()
            self._incoming_settled(incoming)

    def _serve_resume(self, conn: Connection) -> None:
        incoming = self._incoming
        if incoming is None or incoming.migration_id != conn.migration_id:
            serve_unknown_resume(conn)
            return
        incoming.serve_resume(conn)
        self._incoming_settled(incoming)

    def _incoming_settled(self, incoming: IncomingMigration) -> None:
        """Record where an incoming migration stands, once per change: a completed guest runs (or waits
        paused without autostart), a pending one is kept, a failed one is replaced by an empty guest."""
        with self._lock:
            if incoming is not self._incoming or self._incoming_status == incoming.status.value:
                return
            self._incoming_status = incoming.status.value
            self._incoming_error = incoming.error_desc
            if incoming.status == MigrationStatus.COMPLETED:
                if not self._autostart:
                    self.vm.pause()
                log.info("incoming migration completed; guest %s", self.vm.state.value)
                return
            if incoming.status == MigrationStatus.COMMIT_PENDING:
                log.warning("incoming migration: %s", incoming.error_desc)
                return
            if self._closing:
                return
            # A fresh, empty guest for the next attempt: the failed one holds half a stream.
            old = self.vm
            try:
                old.destroy()
            except Exception:  # noqa: BLE001
                log.exception("discarding the failed incoming guest")
            self.vm = self._new_vm(incoming=True)
        log.info("incoming migration failed (%s); waiting for another", incoming.error_desc)

    def _incoming_event(self, name: str, data: dict) -> None:
        if self.caps.events:
            self.emit(name, data)

    # -- command table --------------------------------------------------------------------------------
    def _build_table(self) -> CommandTable:
        t = CommandTable()
        reg: Callable = t.register
        reg("query-status", self.cmd_query_status)
        reg("query-name", lambda args, session: {"name": self.host.name})
        reg("query-uuid", lambda args, session: {"UUID": vm_uuid(self.host.name)})
        reg("query-kvm", lambda args, session: {"enabled": True, "present": True})
        reg("query-cpus-fast", lambda args, session: cpus_fast(self.vm))
        reg(
            "calc-dirty-rate",
            self.cmd_calc_dirty_rate,
            args={
                "calc-time": ("int", True),
                "calc-time-unit": (ArgEnum("second", "millisecond"), False),
                "sample-pages": ("int", False),
                "mode": (ArgEnum("page-sampling", "dirty-ring", "dirty-bitmap"), False),
            },
        )
        reg("query-dirty-rate", lambda args, session: self.dirty_rate.info())
        reg("stop", self.cmd_stop)
        reg("cont", self.cmd_cont)
        reg("system_reset", self.cmd_system_reset)
        reg("quit", self.cmd_quit)
        reg("query-sev", self.cmd_query_sev)
        reg("query-sev-capabilities", self.cmd_query_sev_capabilities)
        reg("migrate-set-parameters", self.cmd_migrate_set_parameters, args=PARAM_SCHEMA)
        reg("query-migrate-parameters", self.cmd_query_migrate_parameters)
        reg(
            "migrate-set-capabilities",
            self.cmd_migrate_set_capabilities,
            args={
                "capabilities": ([{"capability": (ArgEnum(*QEMU_CAPABILITIES), True), "state": ("bool", True)}], True)
            },
        )
        reg("query-migrate-capabilities", self.cmd_query_migrate_capabilities)
        reg(
            "migrate",
            self.cmd_migrate,
            args={
                "uri": ("str", False),
                "channels": ([{"channel-type": (ArgEnum("main"), True), "addr": ("object", True)}], False),
                "detach": ("bool", False),
                "resume": ("bool", False),
                "blk": ("bool", False),
                "inc": ("bool", False),
            },
        )
        reg(
            "migrate-incoming",
            self.cmd_migrate_incoming,
            args={
                "uri": ("str", False),
                "channels": ([{"channel-type": (ArgEnum("main"), True), "addr": ("object", True)}], False),
            },
        )
        reg("migrate_cancel", self.cmd_migrate_cancel)
        reg("query-migrate", self.cmd_query_migrate)
        reg("x-guest-digest", self.cmd_x_guest_digest)
        register_object_commands(t, self.objects, self._objects_in_use)
        reg(
            "x-resolve-migration",
            self.cmd_x_resolve_migration,
            args={"action": (ArgEnum("run-here", "discard-here"), True)},
        )
        return t

    # -- run state ------------------------------------------------------------------------------------
    def cmd_query_status(self, args: dict, session: Session) -> dict:
        with self._lock:  # never the discarded guest of a failed incoming migration mid-replacement
            state = self.vm.state
        return {"status": state.value, "running": state == RunState.RUNNING, "singlestep": False}

    def cmd_stop(self, args: dict, session: Session) -> None:
        with self._lock:
            self._check_alive()
            state = self.vm.state
            if state == RunState.INMIGRATE:
                self._autostart = False  # QEMU: the guest stays paused after the incoming migration
            elif state == RunState.RUNNING:
                self.vm.pause()

    def cmd_cont(self, args: dict, session: Session) -> None:
        with self._lock:
            self._check_alive()
            state = self.vm.state
            if state == RunState.INMIGRATE:
                raise generic_error("Guest is waiting for an incoming migration")
            if state == RunState.FINISH_MIGRATE:
                raise generic_error("Migration is not finalized yet")
            if state == RunState.POSTMIGRATE:
                raise generic_error("The guest has migrated away (SEND_FINISH): it can no longer run on this host")
            if state in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR):
                raise generic_error("Resetting the Virtual Machine is required")
            if state == RunState.PAUSED:
                self.vm.resume()

    def cmd_system_reset(self, args: dict, session: Session) -> None:
        with self._lock:
            self._check_alive()
            state = self.vm.state
            if state == RunState.INMIGRATE:
                raise generic_error("Guest is waiting for an incoming migration")
            if state == RunState.POSTMIGRATE:
                raise generic_error("The guest has migrated away (SEND_FINISH): it can no longer run on this host")
            if self._outgoing is not None and self._outgoing.in_progress:
                raise generic_error("There's a migration process in progress")
            self.vm.reset()
            self.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    def cmd_quit(self, args: dict, session: Session) -> None:
        self.request_shutdown("host-qmp-quit")

    # -- SEV ------------------------------------------------------------------------------------------
    def cmd_query_sev(self, args: dict, session: Session) -> dict:
        vm = self.vm
        if not vm.sev_enabled or vm.sev is None:
            raise generic_error("SEV feature is not available")
        status = PlatformStatusBuf()
        self.host.platform.issue(Cmd.PLATFORM_STATUS, status)
        state = "uninit"
        if vm.sev.handle:
            try:
                gs = vm.sev.op(kvm.sev_cmd_id.KVM_SEV_GUEST_STATUS, kvm.kvm_sev_guest_status())
                state = _SEV_STATE.get(GuestState(gs.state), "uninit")
            except (kvm.KvmError, ValueError):
                pass
        return {
            "enabled": True,
            "api-major": status.api_major,
            "api-minor": status.api_minor,
            "build-id": status.build,
            "policy": vm.policy,
            "state": state,
            "handle": vm.sev.handle,
            "sev-type": "sev-es" if vm.policy & Policy.ES else "sev",
        }

    def cmd_query_sev_capabilities(self, args: dict, session: Session) -> dict:
        if not self.vm.sev_enabled:
            raise generic_error("SEV is not enabled in KVM")
        return self.host.sev_capabilities()

    def cmd_calc_dirty_rate(self, args: dict, session: Session) -> None:
        if args.get("mode", "dirty-bitmap") != "dirty-bitmap":
            raise generic_error("pysev measures the dirty rate from the dirty log only (mode 'dirty-bitmap')")
        self._check_alive()
        job = self._outgoing
        migrating = job is not None and job.in_progress
        self.dirty_rate.start(self.vm, args["calc-time"], args.get("calc-time-unit", "second"), migrating)

    def cmd_x_guest_digest(self, args: dict, session: Session) -> dict:
        self._check_alive()
        vm = self.vm
        if vm.state == RunState.INMIGRATE:
            raise generic_error("Guest is waiting for an incoming migration")
        try:
            return {"digest": vm.digest()}
        except kvm.KvmError as err:
            desc = f"x-guest-digest: the firmware refused the debug read: {err}"
            if vm.policy & Policy.NODBG:
                desc += f" (the guest policy {vm.policy:#x} has NODBG: debugging is forbidden)"
            raise generic_error(desc) from None

    # -- migration parameters and capabilities --------------------------------------------------------
    def cmd_migrate_set_parameters(self, args: dict, session: Session) -> None:
        updates: dict[str, Any] = {}
        for name, value in args.items():
            if name in PARAM_RANGES:
                lo, hi, words = PARAM_RANGES[name]
                if not lo <= value <= hi:
                    raise generic_error(f"Parameter '{name}' expects {words}")
            elif name.startswith("tls-"):
                continue  # TlsParameters
            elif name.startswith("sev-"):
                value = value or ""  # StrOrNull: null resets
                if value:
                    check_sev_parameter(name, value)
            updates[name.replace("-", "_")] = value
        with self._lock:
            tls = self.tls.updated(args, self.objects)
            listener = self._waiting_listener()
            if listener is not None and tls != self.tls:
                try:  # a destination waiting for its migration takes TLS from the next connection on
                    listener.set_tls(*tls.server(self.objects))
                except TlsError as err:
                    raise generic_error(str(err)) from None
            self.tls = tls
            self.params = dataclasses.replace(self.params, **updates)
            job = self._outgoing
            if job is not None and job.in_progress:
                for field in LIVE_PARAMS:
                    if field in updates:
                        setattr(job.params, field, updates[field])

    def cmd_query_migrate_parameters(self, args: dict, session: Session) -> dict:
        return {**self.params.qmp(), **self.tls.qmp()}

    def cmd_migrate_set_capabilities(self, args: dict, session: Session) -> None:
        with self._lock:
            if self._outgoing is not None and self._outgoing.in_progress:
                raise generic_error("There's a migration process in progress")
            updates = {}
            for item in args["capabilities"]:
                name, state = item["capability"], item["state"]
                if name == "return-path" and not state:
                    raise generic_error(
                        "Capability 'return-path' is required: the SEV commit protocol answers on the return path"
                    )
                if state and name not in SUPPORTED_CAPABILITIES:
                    raise generic_error(f"Migration capability '{name}' is not supported by pysev")
                if name in ENGINE_CAPABILITIES:
                    updates[name.replace("-", "_")] = state
            self.caps = dataclasses.replace(self.caps, **updates)

    def cmd_query_migrate_capabilities(self, args: dict, session: Session) -> list:
        """Only the capabilities pysev implements (return-path is always on); QEMU's others are not listed."""
        current = {c["capability"]: c["state"] for c in self.caps.qmp()}
        current["return-path"] = True
        return [
            {"capability": name, "state": bool(current.get(name, False))}
            for name in QEMU_CAPABILITIES
            if name in SUPPORTED_CAPABILITIES
        ]

    # -- migration ------------------------------------------------------------------------------------
    def cmd_migrate(self, args: dict, session: Session) -> None:
        if args.get("resume"):
            self._resume_commit(uri_from(args))
            return
        if args.get("blk") or args.get("inc"):
            raise generic_error("Block migration is not supported by pysev")
        uri = uri_from(args)
        with self._lock:
            self._check_alive()
            if self._outgoing is not None and self._outgoing.in_progress:
                raise generic_error("There's a migration process in progress")
            state = self.vm.state
            if state == RunState.INMIGRATE:
                raise generic_error("Guest is waiting for an incoming migration")
            if state not in (RunState.RUNNING, RunState.PAUSED):
                raise generic_error(
                    f"The guest cannot be migrated in state '{state.value}'"
                    + (" (it has migrated away: SEND_FINISH)" if state == RunState.POSTMIGRATE else "")
                )
            job = OutgoingJob(
                self.vm,
                self.emit,
                uri,
                dataclasses.replace(self.params),
                dataclasses.replace(self.caps),
                tls=self.tls.client(self.objects, uri),
                tls_hostname=self.tls.hostname or None,
            )
            self._outgoing = job
            job.thread.start()
        log.info("migration to %s started", uri)

    def _resume_commit(self, uri: str) -> None:
        """migrate resume=true: deliver a pending COMMIT again, to ``uri`` (QEMU resumes a paused
        post-copy migration the same way; here it is the commit decision that waits)."""
        job = self._outgoing
        m = job.migration if job is not None else None
        if job is None or m is None or m.status != MigrationStatus.COMMIT_PENDING:
            raise generic_error("Cannot resume if there is no paused migration")
        thread = threading.Thread(
            target=self._redeliver, args=(m, job.resume_connect(uri)), name="migration-resume", daemon=True
        )
        thread.start()

    @staticmethod
    def _redeliver(m: OutgoingMigration, connect: Callable[[bytes], Connection]) -> None:
        try:
            m.redeliver(connect)
        except MigrationError as err:
            log.warning("resume: %s", err)

    def cmd_x_resolve_migration(self, args: dict, session: Session) -> dict:
        """Resolve a pending commit by hand when the other host is gone: ``run-here`` or ``discard-here``."""
        run_here = args["action"] == "run-here"
        job = self._outgoing
        m = job.migration if job is not None else None
        try:
            if m is not None and m.status == MigrationStatus.COMMIT_PENDING:
                m.resolve_here(run_here)
                return {"status": m.status.value}
            incoming = self._incoming
            if incoming is not None and incoming.status == MigrationStatus.COMMIT_PENDING:
                incoming.resolve(run_here, by_hand=True)
                self._incoming_settled(incoming)
                return {"status": incoming.status.value}
        except MigrationError as err:
            raise generic_error(str(err)) from None
        raise generic_error("No migration is waiting for a decision on this host")

    def cmd_migrate_incoming(self, args: dict, session: Session) -> None:
        uri = uri_from(args)
        with self._lock:
            self._check_alive()
            if self.incoming_setting is None:
                raise generic_error("'-incoming' was not specified on the command line")
            if self._incoming_status in ("setup", "active", "completed", "x-commit-pending"):
                raise generic_error("The incoming migration has already been started")
            self._close_listener()  # after a failure: the new URI replaces the old listener
            self._listen(uri)

    def cmd_migrate_cancel(self, args: dict, session: Session) -> None:
        job = self._outgoing
        if job is not None and job.in_progress:
            job.cancel()

    def cmd_query_migrate(self, args: dict, session: Session) -> dict:
        job = self._outgoing
        if job is not None:
            return job.info()
        with self._lock:
            status, error, incoming = self._incoming_status, self._incoming_error, self._incoming
        if status is None:
            return {}
        if status == "active" and incoming is not None and incoming.status == "completed":
            # Live: "completed" as soon as the guest runs. A failure is reported only once recorded under
            # the lock, i.e. after the failed guest has been replaced by a fresh one waiting in inmigrate.
            status, error = incoming.status, incoming.error_desc
        info: dict[str, Any] = {"status": status}
        listener = self._listener
        if listener is not None and status in ("setup", "failed"):
            # QEMU's MigrationInfo socket-address: where the destination listens (the real port for port 0).
            info["socket-address"] = [{"type": "inet", "host": str(listener.host), "port": str(listener.port)}]
        if error:
            info["error-desc"] = error
        if incoming is not None:  # pages applied: RECEIVE_UPDATE_DATA accepted / written in the clear
            info["sev"] = {"pages-encrypted": incoming.pages_private, "pages-shared": incoming.pages_shared}
        if status == "completed" and incoming is not None and incoming.guest_digest:
            info["x-guest-digest"] = incoming.guest_digest
        return info

    def _objects_in_use(self) -> set[str]:
        """What object-del must not delete: objects the parameters name, the listener or a migration holds."""
        with self._lock:
            listener, job = self._listener, self._outgoing
            held = [listener.tls, listener.tls_authz] if listener is not None else []
            held += [job.tls] if job is not None and job.in_progress else []
            return {self.tls.creds, self.tls.authz} | {obj.id for obj in held if obj is not None}
