"""keep_freed_host_memory: freed heap stays in the process (no page faults to get it back), on glibc."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
if sys.argv[1] == "keep":
    from autoglm_train.utils.host_memory import keep_freed_host_memory
    assert keep_freed_host_memory()
blocks = [bytearray(16 << 20) for _ in range(12)]  # 192 MiB in 16 MiB blocks (under the mmap threshold once kept)
del blocks
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
blocks = [bytearray(16 << 20) for _ in range(12)]  # the same again: reused pages fault nothing
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_kept_freed_memory_is_reused_without_page_faults() -> None:
    default, kept = _faults("default"), _faults("keep")
    assert default > 40_000  # 192 MiB of fresh pages: one fault per 4 KiB (about 49,000)
    assert kept < default // 10
