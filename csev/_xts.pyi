import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

def xts_encrypt(
    key: Buffer,
    src: npt.NDArray[np.uint8],
    dst: npt.NDArray[np.uint8],
    tweaks: npt.NDArray[np.uint64],
    src_index: npt.NDArray[np.int64] | None = ...,
    dst_index: npt.NDArray[np.int64] | None = ...,
    *,
    threads: int | None = ...,
) -> None: ...
def xts_decrypt(
    key: Buffer,
    src: npt.NDArray[np.uint8],
    dst: npt.NDArray[np.uint8],
    tweaks: npt.NDArray[np.uint64],
    src_index: npt.NDArray[np.int64] | None = ...,
    dst_index: npt.NDArray[np.int64] | None = ...,
    *,
    threads: int | None = ...,
) -> None: ...
def xts_crypt_raw(key: Buffer, tweak: Buffer, data: Buffer, encrypt: bool = ...) -> bytes: ...
