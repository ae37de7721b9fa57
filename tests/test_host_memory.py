"""host_memory against glibc itself: the arenas it lets threads create, the pages it returns."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sslocal import host_memory

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="needs glibc")
ROOT = Path(__file__).resolve().parents[1]

# Eight threads alive at once each malloc once (none can take over an arena another thread
# freed), then glibc's own report counts the heaps (arenas) this fresh process has.
_COUNT_ARENAS = r"""
import ctypes, sys, tempfile, threading
from sslocal import host_memory
print(host_memory.limit_malloc_arenas(int(sys.argv[1])))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
barrier = threading.Barrier(8)
def work():
    block = libc.malloc(1000)
    barrier.wait()
    libc.free(ctypes.c_void_p(block))
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
with tempfile.NamedTemporaryFile(suffix=".xml") as f:
    stream = ctypes.c_void_p(libc.fopen(f.name.encode(), b"w"))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(open(f.name).read().count("<heap nr="))
"""


def _arenas(cap: int, env_cap: str | None = None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if env_cap is not None:
        env["MALLOC_ARENA_MAX"] = env_cap
    out = subprocess.run([sys.executable, "-c", _COUNT_ARENAS, str(cap)], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_arena_cap_holds_threads_to_it():
    assert _arenas(2) == (True, 2)
    assert _arenas(4) == (True, 4)


def test_without_the_cap_each_thread_gets_an_arena():
    # glibc's own limit (8 per core, 16 here) set through the environment, so that the count
    # does not depend on the machine's cores: 8 threads plus the main one
    set_cap, arenas = _arenas(4, env_cap="16")
    assert not set_cap, "a MALLOC_ARENA_MAX the user set must win"
    assert arenas == 9


def test_users_malloc_arena_max_wins():
    assert _arenas(4, env_cap="3") == (False, 3)


def test_release_free_memory_returns_freed_pages():
    """Freed blocks below a live one stay resident (glibc trims only the top of the heap on its
    own) until release_free_memory() hands them back."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p

    def resident_mib() -> float:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    blocks = [libc.malloc(1000) for _ in range(150_000)]  # ~150 MB, below the mmap threshold
    for block in blocks:
        ctypes.memset(block, 1, 1000)  # touch: resident
    pin = libc.malloc(1000)  # above them: the freed space is not the heap's top
    for block in blocks:
        libc.free(ctypes.c_void_p(block))
    held = resident_mib()
    host_memory.release_free_memory()
    released = held - resident_mib()
    libc.free(ctypes.c_void_p(pin))
    assert released > 100, f"only {released:.0f} MiB returned of ~150 freed"
