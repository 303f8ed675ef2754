"""pysev: AMD SEV encrypted-VM live migration in software.

The packages are the layers of the machine, each importing only those below it (``docs/design.md``):
``pysev.hw`` host DRAM and the memory controller; ``pysev.firmware`` the AMD Secure Processor (shared
mailbox, statuses, certificates, the simulated AMD root; ``pysev.firmware.sev`` the SEV command set);
``pysev.kvm`` the KVM_MEMORY_ENCRYPT_OP face; ``pysev.hv`` the hypervisor (guest RAM blocks, dirty log,
page-encryption state, vCPU workload, the VM); ``pysev.migration`` the pre-copy engine, commit protocol,
stream format and transports; ``pysev.qmp`` the QMP server of ``pysev vm``; ``pysev.cli`` the command
line. ``csev`` (a package of its own) holds the native kernels under all of them.
"""

__version__ = "0.2.0"
