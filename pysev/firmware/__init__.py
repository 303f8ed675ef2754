"""The simulated AMD Secure Processor (PSP) firmware of one host.

Shared by every command set: ``mailbox`` (the choke point every command goes through: command buffers,
state-table rows, dispatch), ``status`` (firmware statuses), ``kdf`` (the firmware's key derivation),
``certs`` (SEV and AMD certificate formats and validation), ``amdroot`` (the simulated AMD root and key
server). ``pysev.firmware.sev`` is the SEV / SEV-ES command set (AMD SEV API pub. #55766); a SEV-SNP
command set can sit beside it, subclassing ``mailbox.Mailbox``.
"""
