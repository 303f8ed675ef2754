from collections.abc import Callable

AVAILABLE: bool
REASON: str
PATH: str
VERSION: str
INLINE_BELOW: int

def usable_cores() -> int: ...
def resolve_threads(threads: int | None) -> int: ...
def run_chunks(fn: Callable[[int, int], object], k: int, threads: int) -> None: ...
