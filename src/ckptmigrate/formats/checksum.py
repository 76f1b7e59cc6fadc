"""CRC-32, as zip records carry it, at the speed of the machine's carry-less multiply.

Every record a checkpoint is read from is checked against its CRC (a flipped
bit is caught before it is copied into the output), so the checksum runs
over every byte of every input. zlib's own CRC-32 does about 4 GB/s; ISA-L's
(``isal``, installed with ckptmigrate where it has wheels) uses the CPU's
carry-less multiply instructions and does over 50 GB/s. Both compute the
same function; without ``isal``, zlib's is used.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any


def _fastest() -> Callable[[Any, int], int]:
    try:
        from isal import isal_zlib
    except ImportError:  # no wheel for this platform: zlib computes the same values
        return zlib.crc32
    fast: Callable[[Any, int], int] = isal_zlib.crc32
    return fast


_crc32 = _fastest()

#: The checksum's implementation, for reports: "isal" or "zlib".
IMPLEMENTATION = "zlib" if _crc32 is zlib.crc32 else "isal"


def crc32(data: Any, value: int = 0) -> int:
    """``zlib.crc32(data, value)``: the CRC-32 of a bytes-like ``data``, continuing ``value``."""
    return _crc32(data, value)
