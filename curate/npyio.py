"""The .npy bytes of latent shards: written without pickle, read back with the header checked first."""

from __future__ import annotations

import io

import numpy as np

from latentmill.errors import InputError

LATENT_DTYPE = np.float16


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def checked_npy(data: bytes, shape: tuple, what: str, why: str) -> np.ndarray:
    """A float16 .npy of exactly `shape`, its header checked before anything is allocated (a header may
    claim any shape; numpy would allocate it before noticing the data is short)."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        header = read_header(stream)
    except (ValueError, SyntaxError, TypeError, EOFError) as err:
        raise InputError(f"{what}: not a .npy array ({err}).") from None
    found_shape, fortran, dtype = header
    if tuple(found_shape) != tuple(shape) or dtype != LATENT_DTYPE or fortran:
        raise InputError(
            f"{what} is {dtype}{list(found_shape)}{' (Fortran order)' if fortran else ''}, expected "
            f"float16{list(shape)} {why}."
        )
    offset = stream.tell()
    if len(data) - offset != int(np.prod(shape)) * np.dtype(LATENT_DTYPE).itemsize:
        raise InputError(f"{what}: {len(data) - offset} bytes of data for float16{list(shape)}.")
    return np.frombuffer(data, dtype=LATENT_DTYPE, offset=offset).reshape(shape).copy()  # one copy: writable
