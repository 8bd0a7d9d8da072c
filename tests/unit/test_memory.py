"""keep_freed_memory: freed megabyte blocks stay in the process for the next request."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")

# Allocates and frees a 32 MiB block (the size of a large answer), then prints how much of it
# the process still holds: glibc's defaults map such a block fresh and unmap it when freed.
PROBE = """
import sys
from sparkembed.core.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "tuned" else None

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

before = rss_kib()
block = bytearray(32 << 20)  # zero-filled: every page touched
del block
print(kept, rss_kib() - before)
"""


def held_after_free(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True
    ).stdout.split()
    return out[0], int(out[1])


def test_a_freed_32_mib_block_stays_in_the_process_for_reuse() -> None:
    kept, held_kib = held_after_free("tuned")
    assert kept == "True"
    assert held_kib >= 30 << 10


def test_without_it_glibc_hands_the_block_back() -> None:
    """The control: the probe can tell the difference."""
    _, held_kib = held_after_free("default")
    assert held_kib < 4 << 10
