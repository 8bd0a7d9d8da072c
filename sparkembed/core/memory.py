"""Keep freed heap memory in the process for the next request, instead of handing it back.

Every request moves megabytes: the answer to 1,024 inputs of 1536-d base64 vectors is 8.4 MB
of JSON, then 6 MB of floats, then Arrow and parquet buffers. With glibc's default settings,
such blocks are mapped fresh or trimmed back to the kernel when freed, so the next request
page-faults and zeroes them all over again. On this project's benchmarks that churn cost a
fifth of an executor's CPU and of the local endpoint's (see BENCHMARKS.md).

:func:`keep_freed_memory` raises glibc's mmap and trim thresholds with ``mallopt``: blocks up
to ``mmap_threshold`` come from the heap, and up to ``trim_threshold`` of freed heap stays in
the process. It is a no-op where the C library has no ``mallopt`` (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

log = logging.getLogger(__name__)

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20


@functools.cache
def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set the thresholds once per process; True if the C library took them."""
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library this process runs on
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    kept = all([mallopt(_M_MMAP_THRESHOLD, mmap_threshold), mallopt(_M_TRIM_THRESHOLD, trim_threshold)])
    log.debug("malloc keeps freed memory up to %d MiB: %s", trim_threshold >> 20, kept)
    return kept
