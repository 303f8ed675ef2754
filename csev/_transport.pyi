import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

from csev.packet import RecordSink

def send_pages(
    vek: Buffer,
    tek: Buffer,
    tik: Buffer,
    mem: npt.NDArray[np.uint8],
    index: npt.NDArray[np.int64] | None,
    tweaks: npt.NDArray[np.uint64],
    headers: npt.NDArray[np.uint8],
    trans: npt.NDArray[np.uint8],
    ivs: Buffer | npt.NDArray[np.uint8] | None = ...,  # numpy declares __buffer__ only for Python >= 3.12
    *,
    threads: int | None = ...,
    nontemporal: bool = ...,
    on_slice: RecordSink | None = ...,
) -> None: ...
def receive_pages(
    vek: Buffer,
    tek: Buffer,
    tik: Buffer,
    headers: npt.NDArray[np.uint8],
    trans: npt.NDArray[np.uint8],
    mem: npt.NDArray[np.uint8],
    index: npt.NDArray[np.int64] | None,
    tweaks: npt.NDArray[np.uint64],
    *,
    threads: int | None = ...,
) -> npt.NDArray[np.uint32]: ...
