"""csev's exception, in a module of its own so that the kernels and their twins raise the same class
without importing ``csev._dispatch`` (which imports them)."""

from __future__ import annotations


class MacError(ValueError):
    """An integrity check failed (the firmware's BAD_MEASUREMENT); deliberately says no more."""
