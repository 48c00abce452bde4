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


def checked_npy(data: bytes, shape: tuple, what: str, why: str, dtype=LATENT_DTYPE) -> np.ndarray:
    """A .npy of exactly `shape` and `dtype` (float16: latents), its header checked before anything is allocated (a header may
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
    expected = np.dtype(dtype)
    found_shape, fortran, found = header
    if tuple(found_shape) != tuple(shape) or found != expected or fortran:
        raise InputError(
            f"{what} is {found}{list(found_shape)}{' (Fortran order)' if fortran else ''}, expected "
            f"{expected}{list(shape)} {why}."
        )
    offset = stream.tell()
    if len(data) - offset != int(np.prod(shape)) * expected.itemsize:
        raise InputError(f"{what}: {len(data) - offset} bytes of data for {expected}{list(shape)}.")
    return np.frombuffer(data, dtype=expected, offset=offset).reshape(shape).copy()  # one copy: writable
