"""The fastest float32 matrix product per CPU, layer shape and row count, found by measuring.

Which kernel wins differs between CPUs and shapes: on an AMD EPYC, MKL's products at the few
rows of a decoding step run far below what memory allows, and oneDNN's are up to 2-4x faster
there, while on other shapes and row counts MKL wins. Both kernels read the same column-major
weight (core.precision), so choosing costs no memory. The first time a (shape, rows) pair runs
on a machine, each kernel is timed on that very layer (a few calls, some milliseconds; about a
second for a 58k-row output layer at 256 rows); the choice is kept per CPU model, torch version
and thread count in the user cache (`kernels/*.json` under $TRANSLATE_CACHE or
~/.cache/translate), so later runs start with it.

A choice measured while other work kept the CPUs busy (threads of other processes running at
that moment) serves this process but is not kept: timings taken then say little, and a wrong
choice would stay.

TRANSLATE_KERNEL=mkl or =onednn forces one kernel and measures nothing.

int8 layers (core.precision) choose the same way between the quantized engines torch ships:
fbgemm, fastest at the few rows of a decoding step, and oneDNN, which uses AMX tiles where the
CPU has them (an Intel Xeon with AMX: 3.4x fbgemm for a 58k-row output layer at 128 rows).
Their choices are kept in a file of their own (`*-int8.json`); TRANSLATE_INT8_KERNEL=fbgemm or
=onednn forces one."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from core.machine import busy, cpu_name
from core.userdir import cache_root, written_whole

Kernel = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


KERNELS: dict[str, Kernel] = {"mkl": F.linear}
if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    KERNELS["onednn"] = onednn
INT8_ENGINES = tuple(e for e in ("fbgemm", "onednn")
                     if e in torch.backends.quantized.supported_engines)
TIMED_CALLS = 3  # per kernel, after one untimed call; the fastest call counts


def bucket(rows: int) -> int:
    """Row counts measured as one: the next power of two, up to 256."""
    return 1 << min(max(rows - 1, 0).bit_length(), 8)


def rows(x: Tensor) -> int:
    """The rows a (..., in) input holds: the product of its leading dimensions."""
    return x.numel() // max(x.size(-1), 1)


def fastest(calls: dict[str, Callable[[], object]], handicap: dict[str, float] = {}) -> str:
    """The name of the call that runs fastest (its best of TIMED_CALLS, after one untimed),
    each call's seconds multiplied by its handicap (1 if none): what it must win by."""
    best, best_s = next(iter(calls)), float("inf")
    with torch.inference_mode():
        for name, call in calls.items():
            call()
            for _ in range(TIMED_CALLS):
                start = time.perf_counter()
                call()
                seconds = (time.perf_counter() - start) * handicap.get(name, 1.0)
                if seconds < best_s:
                    best, best_s = name, seconds
    return best


class Chooser:
    """Kernel names by (out, in, row bucket), measured where missing, kept in `path`."""

    def __init__(self, path: Path | None, forced: str | None = None,
                 names: tuple[str, ...] = tuple(KERNELS)):
        self.path, self.forced = path, forced
        self.threads = torch.get_num_threads()  # the choices hold for this many threads
        self.table: dict[str, str] = {}
        self.unsure: set[str] = set()  # measured on a busy machine: not kept
        if path is not None:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.table = {k: v for k, v in data.get("choices", {}).items() if v in names}
            except (OSError, ValueError, AttributeError):
                pass  # none yet, or unreadable: measured again

    @staticmethod
    def key(weight_shape, rows: int) -> str:
        return f"{weight_shape[0]}x{weight_shape[1]}@{bucket(rows)}"

    def choose(self, key: str, measure: Callable[[], str]) -> str:
        """The name kept for `key`, or the one `measure()` finds (kept if the CPUs were idle)."""
        if self.forced:
            return self.forced
        name = self.table.get(key)
        if name is None:
            name = self.table[key] = measure()
            if busy(self.threads):
                self.unsure.add(key)
            else:
                self.save()
        return name

    def kernel(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Kernel:
        n = rows(x)
        key = self.key(weight.shape, n)
        return KERNELS[self.choose(key, lambda: self.measure(weight, bias, bucket(n)))]

    @staticmethod
    def measure(weight: Tensor, bias: Tensor | None, rows: int) -> str:
        x = torch.randn(rows, weight.size(1), dtype=weight.dtype)
        return fastest({name: (lambda k=kernel: k(x, weight, bias))
                        for name, kernel in KERNELS.items()})

    def save(self) -> None:
        if self.path is None:
            return
        try:  # a cache that cannot be written only costs measuring again next time
            with written_whole(self.path, "w", encoding="utf-8") as f:
                json.dump({"cpu": cpu_name(), "torch": torch.__version__,
                           "threads": self.threads,
                           "choices": {k: v for k, v in self.table.items()
                                       if k not in self.unsure}}, f,
                          indent=1, sort_keys=True)
        except OSError:
            pass


# per family: the choices' names, the variable that forces one, the cache file's suffix
FAMILIES = {"float32": (tuple(KERNELS), "TRANSLATE_KERNEL", ""),
            "int8": (INT8_ENGINES, "TRANSLATE_INT8_KERNEL", "-int8")}
_choosers: dict[str, Chooser] = {}


def chooser(family: str = "float32") -> Chooser:
    """The process's Chooser for `family`, made on first use for the current thread count."""
    names, variable, suffix = FAMILIES[family]
    threads = torch.get_num_threads()
    found = _choosers.get(family)
    if found is None or found.threads != threads:
        forced = os.environ.get(variable) or None
        if forced is not None and forced not in names:
            from core.errors import UsageError

            raise UsageError(f"{variable}={forced}: choose from {', '.join(names)}")
        slug = re.sub(r"[^\w.-]+", "_", cpu_name()).strip("_")[:80]
        path = cache_root() / "kernels" / f"{slug}-torch{torch.__version__}-t{threads}{suffix}.json"
        found = _choosers[family] = Chooser(path, forced, names)
    return found


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear with the kernel chosen for this shape and row count on this machine."""
    return chooser().kernel(x, weight, bias)(x, weight, bias)
