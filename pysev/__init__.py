"""pysev: AMD SEV encrypted-VM live migration in software.

Layout (house-style.md): ``pysev.firmware`` is the simulated SEV firmware (AMD-SP) of one host;
``pysev.firmware.certs``/``pysev.firmware.amdroot`` the certificate formats and the simulated AMD root and key server;
``pysev.firmware.sev.session`` the session crypto; ``pysev.kvm`` the KVM_MEMORY_ENCRYPT_OP face; ``pysev.hv`` the
hypervisor side (host memory, guest RAM slots, dirty log, page-encryption state, guest workload);
``pysev.migration`` the QEMU-style migration engine, stream format and transports; ``pysev.qmp`` the
QMP server of ``pysev vm``; ``pysev.cli`` the command line.
"""
__version__ = "0.1.0"
