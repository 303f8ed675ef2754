"""A simulated host and the QEMU-like virtual machine that runs on it.

``Host``: one server — its DRAM, its SEV firmware (``Platform``) and the kernel's KVM side.
``VirtualMachine``: one guest on a host — RAM blocks, the SEV context (KVM_SEV_*), the guest's vCPU
workload and QEMU's run states. The migration engine moves a ``VirtualMachine`` between hosts; it sees
only this object and the ``MemoryEncryptionOps`` that ``pysev.migration.sev_ops`` builds from it.
"""

from __future__ import annotations

import base64
import ctypes
import enum
import hashlib
import logging
import threading
import weakref
from typing import TypedDict

import numpy as np

from csev.packet import PAGE_SIZE
from pysev import kvm
from pysev.firmware.sev import CBITPOS, REDUCED_PHYS_BITS, Platform, Policy, make_policy
from pysev.firmware.sev.abi import MEASURE_SIZE, POLICY_RESERVED_MASK
from pysev.hv.guest import Guest, Workload, page_pattern
from pysev.hv.memory import GuestMemory
from pysev.hw.hostmem import HostMemory

log = logging.getLogger(__name__)

# The main job's default: authenticate the target's AMD chain (SEV bit), require firmware API ≥ 0.17
# (as the published Naples migration used), and allow debugging so the result can be verified.
DEFAULT_POLICY = make_policy(Policy.SEV, 0, 17)
VCPUS = 1  # vCPUs of a simulated guest (one VMSA each under SEV-ES)


class RunState(str, enum.Enum):
    """QEMU's RunState values that this VMM uses (qapi/run-state.json)."""

    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal-error"


class Host:
    """One simulated server: DRAM, SEV firmware and KVM. ``root`` selects the simulated AMD root."""

    def __init__(self, name: str, dram_size: int, *, root=None, seed: int | None = None) -> None:
        self.name = name
        self.dram = HostMemory(dram_size, seed=seed)
        self.platform = Platform(self.dram, root=root)
        self.kvm = kvm.KvmHost(self.platform)  # the PSP driver's INIT (SEV-ES, with its TMR) and first flush
        self._vms: weakref.WeakSet[VirtualMachine] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.platform!r})"

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Destroy every VM still on this host (their vCPU threads stop) and give its DRAM back to the
        operating system. Idempotent; the host is unusable afterwards."""
        for vm in list(self._vms):
            vm.close()
        self.dram.release()

    def sev_capabilities(self) -> dict:
        """query-sev-capabilities (QEMU SevCapability): base64 certificates and platform facts.

        ``cert-chain`` is PEK ‖ OCA ‖ CEK with the CEK as the key server signs it, ``amd-cert-chain``
        is ASK ‖ ARK: together what a source's SEND_START needs to authenticate this host.
        """
        certs = self.platform.public_certs()
        b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
        return {
            "pdh": b64(certs["pdh"]),
            "cert-chain": b64(certs["cert_chain"]),
            "cpu0-id": b64(self.platform.chip_id),
            "cbitpos": CBITPOS,
            "reduced-phys-bits": REDUCED_PHYS_BITS,
            "amd-cert-chain": b64(certs["amd_cert_chain"]),
        }


class WorkloadArgs(TypedDict):
    """A VM's workload settings, named as ``VirtualMachine``'s arguments."""

    dirty_rate: float
    workload: str
    convert_rate: float
    vga_fps: float
    seed: int | None


class VirtualMachine:
    """A guest on a host, with QEMU-like lifecycle. ``incoming=True`` creates an empty VM waiting
    for an incoming migration (RECEIVE_START replaces the launch)."""

    def __init__(
        self,
        host: Host,
        memory_size: int,
        *,
        sev: bool = True,
        policy: int = DEFAULT_POLICY,
        incoming: bool = False,
        dirty_rate: float = 0.0,
        workload: str = "uniform",
        convert_rate: float = 0.0,
        vga_fps: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if isinstance(memory_size, bool) or not isinstance(memory_size, int):
            raise TypeError(f"memory_size: bytes as an int (e.g. 256 << 20), not {memory_size!r}")
        if memory_size <= 0 or memory_size % PAGE_SIZE:
            raise ValueError(f"memory_size: a positive multiple of {PAGE_SIZE} bytes, not {memory_size}")
        if isinstance(policy, bool) or not isinstance(policy, int) or not 0 <= policy <= 0xFFFFFFFF:
            raise ValueError(f"policy: a 32-bit guest policy (AMD SEV API), not {policy!r}")
        if policy & POLICY_RESERVED_MASK:
            raise ValueError(f"policy {policy:#x}: reserved bits {policy & POLICY_RESERVED_MASK:#x} are set")
        for name, rate in (("dirty_rate", dirty_rate), ("convert_rate", convert_rate), ("vga_fps", vga_fps)):
            if not rate >= 0:
                raise ValueError(f"{name}: must be >= 0, not {rate!r}")
        if convert_rate and not sev:
            raise ValueError(
                "convert_rate: a guest without SEV has no private pages to convert "
                "(KVM_HC_MAP_GPA_RANGE changes the encryption state of SEV guest pages)"
            )
        self.host = host
        host._vms.add(self)
        self.sev_enabled = sev
        self.policy = policy if sev else 0
        self.memory = GuestMemory(host.dram, memory_size, encrypted=sev)
        if incoming:  # preallocate, as a QEMU destination with -mem-prealloc: no faults mid-migration
            for block in self.memory.blocks:
                host.dram.populate(block.frames)
        self._state = RunState.INMIGRATE if incoming else RunState.PRELAUNCH
        self._state_lock = threading.Lock()
        self.state_listeners: list = []
        self.sev: kvm.SevKvm | None = None
        self.guest: Guest | None = None
        self.workload: Workload | None = None
        self._workload_args = WorkloadArgs(
            dirty_rate=dirty_rate, workload=workload, convert_rate=convert_rate, vga_fps=vga_fps, seed=seed
        )
        self._seed = seed
        # SEV-ES: one VMSA page per vCPU, outside guest RAM (KVM allocates them), encrypted under the VEK.
        self.es = bool(sev and policy & Policy.ES)
        self.vmsa_hpas: list[int] = [host.dram.alloc_kernel(PAGE_SIZE) for _ in range(VCPUS)] if self.es else []
        if sev:
            self.sev = host.kvm.create_vm()
            self.sev.op(kvm.sev_cmd_id.KVM_SEV_ES_INIT if policy & Policy.ES else kvm.sev_cmd_id.KVM_SEV_INIT)
        if not incoming:
            self._launch()
            _, guest_workload = self._attach_guest()
            self.set_state(RunState.RUNNING)
            guest_workload.start()

    def __repr__(self) -> str:
        return f"VirtualMachine(host={self.host.name!r}, state={self.state.value}, sev={self.sev_enabled})"

    # -- state ---------------------------------------------------------------------------------------
    @property
    def state(self) -> RunState:
        return self._state

    def set_state(self, state: RunState) -> None:
        with self._state_lock:
            old, self._state = self._state, state
        if old != state:
            log.info("%s: %s -> %s", self.host.name, old.value, state.value)
            for listener in list(self.state_listeners):
                listener(old, state)

    @property
    def asid(self) -> int:
        return self.sev.asid if self.sev else 0

    # -- launch (the SEV firmware measures what it encrypts) ------------------------------------------
    def _launch(self) -> None:
        """LAUNCH_START → LAUNCH_UPDATE_DATA of the boot image in RAM → LAUNCH_MEASURE → LAUNCH_FINISH.

        The boot image is a small deterministic "kernel" in the first RAM pages, written in the clear by
        the VMM and encrypted in place by the firmware, as QEMU does for OVMF/kernel blobs.
        """
        ram = self.memory.blocks[0]
        boot = _boot_image(4)
        self.host.dram.frames[ram.frames[: len(boot)].astype(np.int64)] = boot
        if not self.sev:
            return
        start = self.sev.op(kvm.sev_cmd_id.KVM_SEV_LAUNCH_START, kvm.kvm_sev_launch_start(policy=self.policy))
        log.info("%s: LAUNCH_START handle %d asid %d", self.host.name, start.handle, self.sev.asid)
        for frame in ram.frames[: len(boot)]:
            self.sev.op(
                kvm.sev_cmd_id.KVM_SEV_LAUNCH_UPDATE_DATA,
                kvm.kvm_sev_launch_update_data(uaddr=self.sev.uaddr_of_hpa(int(frame) * PAGE_SIZE), len=PAGE_SIZE),
            )
        for vcpu, hpa in enumerate(self.vmsa_hpas):  # LAUNCH_UPDATE_VMSA: the initial register state
            self.host.dram.write(hpa, _initial_vmsa(vcpu))
            self.sev.op(
                kvm.sev_cmd_id.KVM_SEV_LAUNCH_UPDATE_VMSA,
                kvm.kvm_sev_launch_update_data(uaddr=self.sev.uaddr_of_hpa(hpa), len=PAGE_SIZE),
            )
        measure = ctypes.create_string_buffer(MEASURE_SIZE)
        self.sev.op(
            kvm.sev_cmd_id.KVM_SEV_LAUNCH_MEASURE,
            kvm.kvm_sev_launch_measure(uaddr=ctypes.addressof(measure), len=MEASURE_SIZE),
        )
        self.launch_measurement = measure.raw
        self.sev.op(kvm.sev_cmd_id.KVM_SEV_LAUNCH_FINISH)

    def workload_args(self) -> WorkloadArgs:
        """This VM's workload settings, as constructor arguments (a migrated guest keeps its workload)."""
        return self._workload_args.copy()

    def _attach_guest(self) -> tuple[Guest, Workload]:
        memctl = self.host.platform.memctl
        guest = self.guest = Guest(self.memory, memctl if self.sev else None, self.asid, seed=self._seed)
        args = self._workload_args
        self.workload = Workload(
            guest,
            dirty_rate=args["dirty_rate"],
            pattern=args["workload"],
            convert_rate=args["convert_rate"],
            vga_fps=args["vga_fps"],
            seed=args["seed"],
        )
        return guest, self.workload

    def _attached(self) -> tuple[Guest, Workload]:
        if self.guest is None or self.workload is None:
            raise RuntimeError(f"{self.host.name}: no guest yet (an incoming VM has one after prepare_incoming)")
        return self.guest, self.workload

    def prepare_incoming(self) -> None:
        """Destination, all pages received: attach the guest with the migrated page-encryption state
        (its page tables agree with the state map the source sent)."""
        guest, _ = self._attach_guest()
        guest.load_cbits_from_state_map()

    def incoming_complete(self) -> None:
        """Destination, after RECEIVE_FINISH: run the guest."""
        _, workload = self._attached()
        self.set_state(RunState.RUNNING)
        workload.start()

    def boot_fill(self) -> None:
        """The guest initialises all of its RAM (as an OS populates memory), so every page holds known
        plaintext that verification can compare."""
        guest, _ = self._attached()
        ram = self.memory.ram
        self.host.dram.populate(ram.frames)  # all of it will be touched: back it with huge pages
        chunk = 4096
        for first in range(0, ram.npages, chunk):
            gfns = np.arange(first, min(first + chunk, ram.npages), dtype=np.int64) + ram.gpa // PAGE_SIZE
            guest.write_pages(gfns, page_pattern(gfns, seq=0))

    # -- lifecycle -----------------------------------------------------------------------------------
    def pause(self, state: RunState = RunState.PAUSED) -> None:
        if self.workload:
            self.workload.pause()
        self.set_state(state)

    def resume(self) -> None:
        if self.workload:
            self.workload.resume()
        self.set_state(RunState.RUNNING)

    def reset(self) -> None:
        """system_reset: the guest reboots; page-encryption state returns to its boot default."""
        if self.workload:
            self.workload.reset()
        else:
            self.memory.reset_encryption_state()

    def __enter__(self) -> VirtualMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """``destroy()`` unless already done."""
        if self.state != RunState.SHUTDOWN:
            self.destroy()

    def destroy(self) -> None:
        """Tear down: stop vCPUs, decommission the SEV context, give the frames back to the host."""
        if self.workload:
            self.workload.stop()
        if self.sev:
            self.sev.destroy()
        for hpa in self.vmsa_hpas:
            self.host.dram.free_kernel(hpa, PAGE_SIZE)
        self.vmsa_hpas = []
        self.memory.free()
        self.set_state(RunState.SHUTDOWN)

    # -- what the migration engine reads and writes in the clear ------------------------------------------
    def read_shared_pages(self, block, pages: np.ndarray) -> np.ndarray:
        """The DRAM contents of ``pages`` (indices into ``block``): what a shared page holds, in the clear."""
        return self.host.dram.frames[block.frames[pages].astype(np.int64)]

    def write_shared_page(self, block, page: int, data: bytes | None) -> None:
        """Store a shared page received in the clear (``None``: a zero page)."""
        frame = int(block.frames[page])
        if data is None:
            self.host.dram.frames[frame] = 0
        else:
            self.host.dram.frames[frame] = np.frombuffer(data, dtype=np.uint8)

    # -- verification ----------------------------------------------------------------------------------
    def plaintext_pages(self, block, first: int, count: int, out: np.ndarray) -> np.ndarray:
        """Plaintext of pages [first, first+count) of ``block``: private pages through the firmware's
        debug path (DBG_DECRYPT; refused under NODBG), shared pages straight from DRAM."""
        frames = block.frames[first : first + count]
        out[:count] = self.host.dram.frames[frames.astype(np.int64)]
        if self.sev and not block.shared_by_nature:
            words = block.enc[first // 64 : (first + count + 63) // 64]  # ``first`` is a multiple of 64
            private = np.unpackbits(words.view(np.uint8), bitorder="little")[:count].astype(bool)
            if private.any():
                plain = np.empty((int(private.sum()), PAGE_SIZE), dtype=np.uint8)
                self.sev.dbg_decrypt_batch(frames[private], plain)
                out[:count][private] = plain  # (boolean indexing copies: decrypt first, then scatter)
        return out[:count]

    def agent_digest(self) -> str:
        """The digest a guest agent computes from inside the guest: every block's plaintext as the guest
        reads it (through its own key) and its own private/shared map, in block order. For a guest whose
        policy forbids the host's debug path (NODBG). The guest cannot read its VMSAs, so they are not
        covered; the prefix keeps it from ever equalling a host-side ``digest()``."""
        guest, _ = self._attached()
        h = hashlib.sha256(b"guest-agent\0")
        for block in self.memory.blocks:
            h.update(block.idstr.encode() + b"\0")
            h.update(guest.cbit_map(block).tobytes())
            base = block.gpa // PAGE_SIZE
            for first in range(0, block.npages, 4096):
                gfns = np.arange(first, min(first + 4096, block.npages), dtype=np.int64) + base
                h.update(guest.read_pages(gfns).tobytes())
        return h.hexdigest()

    def verification_digest(self, host_can_read: bool) -> str:
        """``digest()`` through the firmware's debug path when the policy allows it, else the guest
        agent's ``agent_digest()``: the same on both ends of a migration, so the two can be compared."""
        return self.digest() if host_can_read else self.agent_digest()

    def digest(self) -> str:
        """SHA-256 over every block's plaintext (in block order) and its private/shared map, and for
        SEV-ES guests the plaintext of every vCPU's VMSA."""
        h = hashlib.sha256()
        if self.vmsa_hpas:
            assert self.sev is not None  # VMSAs are SEV-ES state
            vmsas = np.empty((len(self.vmsa_hpas), PAGE_SIZE), dtype=np.uint8)
            self.sev.dbg_decrypt_batch(np.array(self.vmsa_hpas, dtype=np.uint64) // PAGE_SIZE, vmsas)
            h.update(b"vmsa\0" + vmsas.tobytes())
        buf = np.empty((4096, PAGE_SIZE), dtype=np.uint8)
        for block in self.memory.blocks:
            h.update(block.idstr.encode() + b"\0")
            h.update(block.enc.tobytes())
            for first in range(0, block.npages, len(buf)):
                count = min(len(buf), block.npages - first)
                h.update(self.plaintext_pages(block, first, count, buf).tobytes())
        return h.hexdigest()


def _initial_vmsa(vcpu: int) -> bytes:
    """A recognisable stand-in for a vCPU's reset register state (the VMSA layout is not modelled)."""
    text = b"pysev SEV-ES VMSA of vCPU %d: register state at reset\n" % vcpu
    return (text * (PAGE_SIZE // len(text) + 1))[:PAGE_SIZE]


def _boot_image(npages: int) -> np.ndarray:
    """A deterministic stand-in for the measured boot firmware."""
    image = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
    text = b"pysev boot image: measured by LAUNCH_UPDATE_DATA, encrypted under the guest's VEK\n"
    for i in range(npages):
        image[i, : len(text)] = np.frombuffer(text, dtype=np.uint8)
        image[i, len(text) :] = (np.arange(PAGE_SIZE - len(text)) * (i + 7)) & 0xFF
    return image
