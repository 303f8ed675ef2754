"""The simulated AMD Secure Processor (PSP) firmware of one host.

Shared by every command set: ``status`` (firmware statuses), ``certs`` (SEV and AMD certificate
formats), ``amdroot`` (the simulated AMD root and key server). ``pysev.firmware.sev`` is the SEV /
SEV-ES command set (AMD pub. #55766).
"""
