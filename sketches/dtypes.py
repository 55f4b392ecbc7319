"""Safetensors dtypes: their sizes, and decoding raw little-endian bytes into float32 arrays.

Every dtype decodes to float32 in C order, because everything downstream (sketches, kurtosis, exact
distances) works in float32. numpy has no bfloat16 and no float8, so:

- BF16 is the high half of an IEEE float32: shift the uint16 into the top 16 bits of a uint32 and view it.
- F8_E4M3 (the "e4m3fn" of PyTorch and the OCP spec) and F8_E5M2 go through a 256-entry float32 lookup
  table built once at import, from the bit layout below.

    F8_E4M3: s eeee mmm, bias 7, subnormals when e == 0, no infinities; 0x7F and 0xFF are NaN; max 448.
    F8_E5M2: s eeeee mm, bias 15, subnormals when e == 0, e == 31 is inf (m == 0) or NaN (m != 0).

Integer and BOOL tensors are cast to float32 (BOOL becomes 0.0 / 1.0; 64-bit integers lose precision
above 2**24, which a weight sketch never needs).
"""

from __future__ import annotations

import math

import numpy as np

from errors import SafetensorsError

# Bytes per element of every dtype we read; anything else in a header is refused as unknown.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "I16": 2,
    "I32": 4,
    "I64": 8,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "BOOL": 1,
}

# dtypes numpy reads directly, always little-endian ('<') whatever the machine.
_NUMPY_DTYPES: dict[str, str] = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I8": "i1",
    "U8": "u1",
    "I16": "<i2",
    "I32": "<i4",
    "I64": "<i8",
    "U16": "<u2",
    "U32": "<u4",
    "U64": "<u8",
}


def _float8_table(*, exponent_bits: int, mantissa_bits: int, ieee_specials: bool) -> np.ndarray:
    """The float32 value of each of the 256 bytes of a float8 format (sign, exponent, mantissa)."""
    bias = (1 << (exponent_bits - 1)) - 1
    max_exp = (1 << exponent_bits) - 1
    max_man = (1 << mantissa_bits) - 1
    table = np.empty(256, dtype=np.float32)
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exp = (byte >> mantissa_bits) & max_exp
        man = byte & max_man
        if ieee_specials and exp == max_exp:  # E5M2: the top exponent is inf / NaN, as in IEEE 754
            value = sign * math.inf if man == 0 else math.nan
        elif not ieee_specials and exp == max_exp and man == max_man:  # E4M3fn: only S.1111.111 is NaN
            value = math.nan
        elif exp == 0:  # subnormal: no implicit leading 1, exponent fixed at 1 - bias
            value = sign * math.ldexp(man / (1 << mantissa_bits), 1 - bias)
        else:
            value = sign * math.ldexp(1.0 + man / (1 << mantissa_bits), exp - bias)
        table[byte] = value
    table.flags.writeable = False
    return table


F8_E4M3_TABLE = _float8_table(exponent_bits=4, mantissa_bits=3, ieee_specials=False)
F8_E5M2_TABLE = _float8_table(exponent_bits=5, mantissa_bits=2, ieee_specials=True)
_F8_TABLES = {"F8_E4M3": F8_E4M3_TABLE, "F8_E5M2": F8_E5M2_TABLE}


def decode(raw: bytes, dtype: str, shape: tuple[int, ...], *, name: str = "") -> np.ndarray:
    """Decode `raw` (little-endian, C order) into a new, writable float32 array of `shape`.

    Raises SafetensorsError (thing = `name`) for an unknown dtype, a bad shape, or a byte count that is
    not exactly numel * itemsize.
    """
    thing = name or "<tensor>"
    if dtype not in DTYPE_SIZES:
        raise SafetensorsError(thing, f"unknown dtype {dtype!r} (known: {', '.join(sorted(DTYPE_SIZES))})")
    if any(type(d) is not int or d < 0 for d in shape):
        raise SafetensorsError(thing, f"shape {list(shape)} must be whole numbers >= 0")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if len(raw) != expected:
        raise SafetensorsError(
            thing, f"{dtype} {list(shape)} needs {expected} bytes but {len(raw)} were given"
        )
    if dtype in _NUMPY_DTYPES:
        # F64 beyond float32's range becomes +-inf, as torch's .float() does: not worth a warning
        with np.errstate(over="ignore"):
            flat = np.frombuffer(raw, dtype=_NUMPY_DTYPES[dtype]).astype(np.float32)
    elif dtype == "BF16":
        # native uint32 -> native float32 view: the bit pattern is the same on any machine
        flat = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    elif dtype == "BOOL":
        flat = (np.frombuffer(raw, dtype="u1") != 0).astype(np.float32)
    else:  # F8_*: one table lookup per byte
        flat = _F8_TABLES[dtype][np.frombuffer(raw, dtype="u1")]
    return flat.reshape(shape)
