"""Which CPU this is, for choices measured per machine and for benchmark reports, and the
process settings made before the work starts (no torch imported here)."""

from __future__ import annotations

import ctypes
import functools
import os
import re
import time
from pathlib import Path


@functools.cache
def cpuinfo() -> str:
    """/proc/cpuinfo's text, read once ("" where there is no such file)."""
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_name() -> str:
    """The CPU's model name, with its family and model numbers (virtual machines often name
    every generation of a vendor's CPUs alike, e.g. "AMD EPYC")."""
    info = cpuinfo()
    fields = {key: re.search(rf"^{key}\s*:\s*(.+)$", info, re.MULTILINE)
              for key in ("model name", "cpu family", "model")}
    name = fields["model name"][1].strip() if fields["model name"] else os.uname().machine
    if fields["cpu family"] and fields["model"]:
        name += f" family {fields['cpu family'][1].strip()} model {fields['model'][1].strip()}"
    return name


def cpu_flags() -> set[str]:
    """The CPU's feature flags (`flags` in /proc/cpuinfo; none where there is no such file)."""
    found = re.search(r"^flags\s*:\s*(.*)$", cpuinfo(), re.MULTILINE)
    return set(found[1].split()) if found else set()


def others_running() -> float:
    """Threads of other processes running or ready to run now: on Linux, the kernel's count of
    runnable threads less this process's own (the least of three looks, 10 ms apart: right
    after a large product one more thread is often seen runnable for a moment); elsewhere the
    1-minute load average less one. Not the load average where the count exists: it lags by a
    minute, so the process that ran just before (a benchmark, the user's previous `translate`)
    made this one look busy."""
    try:
        looks = []
        for _ in range(3):
            # our threads running both before and after the count: one that woke in between
            # (a library's helper thread) is not taken from the other processes' share
            before = own_running()
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
            looks.append(running - min(before, own_running()))
            if looks[-1] <= 0:
                break
            time.sleep(0.01)
        return min(looks)
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] - 1


def own_running() -> int:
    """This process's threads that are running or ready to run."""
    return sum(stat.read_text().rpartition(")")[2].split()[0] == "R"
               for stat in Path("/proc/self/task").glob("*/stat"))


def busy(threads: int) -> bool:
    """Are other processes using the CPUs this one's `threads` need?"""
    return others_running() > max(0, (os.cpu_count() or 1) - threads) + 0.5


def calm_threads_when_busy(environ=os.environ) -> None:
    """Where other processes are at work when we start, torch's OpenMP threads sleep between
    parallel regions instead of spinning (OMP_WAIT_POLICY=PASSIVE), unless the user chose a
    policy. A spinning team waits at the end of every region for the thread the OS has set
    aside for another process: on a 2-core Ice Lake with two trainings at work, float32 W1
    went from 12-18 to 21-37 tokens/s and W3 from 37-122 to 161-170. OpenMP reads it when
    torch loads, so call this before importing torch; on an idle machine nothing changes."""
    if "OMP_WAIT_POLICY" not in environ and busy(os.cpu_count() or 1):  # torch's default
        environ["OMP_WAIT_POLICY"] = "PASSIVE"


@functools.cache
def glibc():
    """glibc (malloc_trim, mallopt), or None where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if all(hasattr(libc, f) for f in ("malloc_trim", "mallopt")) else None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
REUSED = 32 << 20  # blocks up to this size come from the heap (glibc's own upper limit)
KEPT = 64 << 20  # free memory at the heap's top returned to the system past this much


def reuse_freed_memory(environ=os.environ) -> None:
    """Have glibc keep freed blocks of up to 32 MB for the next step's tensors, unless the user
    set MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_. By default glibc maps such a block
    afresh until one of its size is freed, and gives the heap's top back to the system once
    twice that is free there, so the next step's same tensors (beam search's logits: 30 MB for
    128 rows of 58k) fault in their pages anew, about a microsecond per 4 KB. int8, W4 of
    benchmarks/, one thread (Zen 4 EPYC): 270,000-300,000 page faults a pass, 110,000 so; the
    peak memory the same. Process-wide, so the command line sets it when it translates, not
    the library."""
    libc = glibc()
    if libc is None or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & environ.keys():
        return
    libc.mallopt(M_MMAP_THRESHOLD, REUSED)
    libc.mallopt(M_TRIM_THRESHOLD, KEPT)
