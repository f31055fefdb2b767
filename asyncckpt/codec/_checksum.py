"""CRC32C: of bytes, and of concatenated bytes from their parts' CRC32Cs (pure).

:func:`checksum_combine` joins two CRC32Cs without the bytes (zlib's ``crc32_combine``
method over GF(2) matrices), so one pass over a shard's payloads yields each blob's CRC32C
and the whole span's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import crc32c as _crc32c


def checksum(data: Any, value: int = 0) -> int:
    """CRC32C of a bytes-like object, continuing from ``value``."""
    return _crc32c.crc32c(data, value)


_CRC32C_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _gf2_times(matrix: list[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, row) for row in matrix]


@functools.cache
def _zero_byte_operators() -> tuple[list[int], ...]:
    """Operator ``k`` appends ``2**k`` zero bytes to a CRC (zlib's crc32_combine method)."""
    one_zero_bit = [_CRC32C_POLY] + [1 << n for n in range(31)]
    operator = _gf2_square(_gf2_square(_gf2_square(one_zero_bit)))  # one zero byte
    operators = []
    for _ in range(64):
        operators.append(operator)
        operator = _gf2_square(operator)
    return tuple(operators)


def checksum_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC32C of ``a + b`` from the CRC32Cs of ``a`` and ``b`` and ``len(b)``, without the
    bytes (a few microseconds), so one pass yields both per-blob and whole-shard CRCs."""
    operators = _zero_byte_operators()
    k = 0
    while length_b:
        if length_b & 1:
            crc_a = _gf2_times(operators[k], crc_a)
        length_b >>= 1
        k += 1
    return crc_a ^ crc_b


def combine_checksums(crcs: Sequence[int], lengths: Sequence[int]) -> int:
    """The CRC32C of consecutive buffers from theirs and their lengths."""
    crc = 0
    for part, length in zip(crcs, lengths):
        crc = checksum_combine(crc, part, length)
    return crc
