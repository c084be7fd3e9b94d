"""The fastest float32 matrix product per CPU, layer shape and row count, found by measuring.

Which kernel wins differs between CPUs, shapes and row counts: on an AMD EPYC (Zen 4, 2
threads), MKL's product with one row reads a 58k x 512 output layer at 24 GB/s where memory
gives 60, and oneDNN's is faster for some shapes and slower for others. The kernels all read
the same column-major weight (core.precision), so choosing costs no memory: MKL's (F.linear),
oneDNN's, and `split2`/`split8`, one batched product over 2 or 8 blocks of the weight's rows,
which keeps both threads reading memory where the plain product leaves one idle at a decoding
step's few rows (one row of that output layer: 2.8-3.6 ms against MKL's 4.8 and oneDNN's 5.7).

The kernels are timed on the model's own calls as it runs, so in the state its weights are
really in (a model larger than the last-level cache reads every weight from memory each
decoding step; a small one finds them cached, and the winners differ): the first calls of
each (shape, row bucket) try the kernels in turn (Trial), and the fastest is kept per CPU
model, torch version and thread count in the user cache (`kernels/*.json` under
$TRANSLATE_CACHE or ~/.cache/translate), so later runs start with it. A trial costs a few
dozen calls of the slower kernels, once per machine; one that a process leaves unfinished
(a one-sentence run) goes on in the next.

A choice measured while other work kept the CPUs busy (threads of other processes running at
that moment) serves this process but is not kept: timings taken then say little, and a wrong
choice would stay.

Which weight layout a shape's layers keep, column-major or oneDNN's own packed one (which its
product reads faster at a few rows and more), is tried the same way on their calls of more
than one row once the shape's kernel is chosen (core.precision.TunedLinear) and kept in the
same file.

Calls with one row (a decoding step of one sentence, greedily or sampled) may go instead to
RowBlocks over a row-major copy of the matrix, tried in pairs of calls against the layer's own
way the same way and kept per shape only where it wins (core.precision.TunedLinear).

The tied output layer (core.precision.TiedOutput) chooses the same way per row count, in a
family and file of its own (`*-output.json`), among the kernels and one more, "packed": its
matrix is the embedding table too and stays plain, so its packed copy is held beside it, and
is chosen only where PACKED_WIN times faster.

TRANSLATE_KERNEL=mkl, =onednn, =split2 or =split8 forces one kernel on the plain weight and
measures nothing.

int8 layers (core.precision) choose the same way between the int8 engines torch ships: fbgemm,
fastest at the few rows of a decoding step, and oneDNN, which uses AMX tiles where the CPU has
them (an Intel Xeon with AMX: 3.4x fbgemm for a 58k-row output layer at 128 rows) and is faster
at a batch's rows on others too (Zen 4 EPYC, one thread, that layer at 128 rows: 21 ms against
25). Moving a layer repacks it, so they are timed side by side on the layer by `fastest()`
instead, and kept in a file of their own (`*-int8b.json`); TRANSLATE_INT8_KERNEL=fbgemm or
=onednn forces one."""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from core.machine import busy, cpu_name
from core.userdir import cache_root, written_whole

Kernel = Callable[[Tensor, Tensor, Tensor | None], Tensor]
LAYOUTS = ("packed", "plain")


def onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def pack(weight: Tensor) -> Tensor:
    """`weight` (out, in) in oneDNN's layout for its product (onednn() takes it), a copy; its
    to_dense() gives the matrix back."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def block_rows(rows: int, blocks: int) -> tuple[int, int]:
    """`blocks` blocks over `rows` rows, all one stride apart and of one size, so that a
    single strided view holds them: (stride, size). Where the blocks do not divide the rows,
    the last one starts a few rows early (it overlaps its neighbour) and those rows are
    dropped from its result."""
    step = rows // blocks
    return step, rows - (blocks - 1) * step


def split(x: Tensor, weight: Tensor, bias: Tensor | None, blocks: int) -> Tensor:
    """x W^T + b as one batched product over `blocks` blocks of W's rows (block_rows()), views
    of the weight whatever its layout: batch entries go to threads whole, where a product with
    a decoding step's few rows leaves all but one thread idle."""
    out_features, in_features = weight.shape
    if out_features < blocks:
        return F.linear(x, weight, bias)
    step, size = block_rows(out_features, blocks)
    wt = weight.t()  # (in, out), a view
    w = wt.as_strided((blocks, in_features, size),
                      (step * wt.stride(1), wt.stride(0), wt.stride(1)))  # (G, in, size)
    x2 = x.reshape(-1, in_features)  # (R, in)
    xs = x2.expand(blocks, *x2.shape)  # (G, R, in)
    if bias is None:
        y = torch.bmm(xs, w)  # (G, R, size)
    else:
        y = torch.baddbmm(bias.as_strided((blocks, 1, size), (step, 0, 1)), xs, w)
    if size == step:
        out = y.permute(1, 0, 2).reshape(x2.size(0), out_features)  # (R, out)
    else:
        out = torch.cat([*y[:-1, :, :step], y[-1]], dim=-1)  # (R, out)
    return out.view(*x.shape[:-1], out_features)  # (..., out)


class RowBlocks:
    """x W^T + b for a row-major W (out, in), as one batched product of `blocks` blocks of W's
    rows by x: each block is one stretch of memory that a thread streams whole, where every
    kernel on the column-major or packed weight reads short runs of it. Faster at one row
    only (Zen 4 EPYC, 2 threads, cold, one row: 2048 x 512 0.12-0.14 ms, 512 x 2048 0.10-0.14,
    512 x 512 0.032-0.042, against the best of the others' 0.15-0.16, 0.17-0.20 and
    0.062-0.065; at 4 rows and more 1.1-2.8x slower than oneDNN's packed layout), so a layer
    holds one for one-row calls only where its shape's trial keeps it
    (core.precision.TunedLinear). The blocks are block_rows()'s. The orientation matters:
    split() over the same row-major blocks, x times each block transposed, took 1.07-2.2x as
    long.

    The blocks' views are made once: made at each call, they and the rest of its set-up took
    10 us of a 512 x 512 call's 26 (now 3 of 23; float32 W1 1.01-1.04x, one process switching
    between the two)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, blocks: int = 4):
        self.weight, self.bias = weight, bias  # (out, in) row-major, (out,)
        out_features, in_features = weight.shape
        self.blocks = min(blocks, out_features)
        self.step, self.size = block_rows(out_features, self.blocks)
        self.w = weight.as_strided((self.blocks, self.size, in_features),
                                   (self.step * in_features, in_features, 1))  # (G, size, in)
        self.b = None if bias is None else bias.as_strided(
            (self.blocks, self.size, 1), (self.step, 1, 0))  # (G, size, 1)

    def __call__(self, x: Tensor) -> Tensor:
        out_features, in_features = self.weight.shape
        x2 = x.reshape(-1, in_features)  # (R, in)
        xs = x2.t().expand(self.blocks, in_features, x2.size(0))  # (G, in, R)
        y = torch.bmm(self.w, xs) if self.b is None else torch.baddbmm(self.b, self.w, xs)
        if self.size != self.step:  # (G, size, R); the last block overlaps its neighbour
            y = torch.cat([*y[:-1, :self.step], y[-1]])[None]  # (1, out, R)
        if x2.size(0) > 1:
            y = y.permute(2, 0, 1)  # (R, G, size): one row's output, block after block
        return y.reshape(*x.shape[:-1], out_features)  # (..., out)


# the batched product in 2 blocks (one per thread of two) and in 8 (smaller pieces: for some
# shapes and row counts the faster, e.g. a 512 x 512 layer at one row on a Zen 4 EPYC)
KERNELS: dict[str, Kernel] = {"mkl": F.linear, "split2": functools.partial(split, blocks=2),
                              "split8": functools.partial(split, blocks=8)}
if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    KERNELS["onednn"] = onednn
# a weight in oneDNN's own blocked layout, which its product reads faster than a plain one (Zen
# 4, cold, one row / 4 / 32: 512 x 2048 0.172 / 0.173 / 0.396 ms against the best plain kernel's
# 0.257 / 0.253 / 0.565); core.precision's layers move to it where trials say so
PACKABLE = "onednn" in KERNELS and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
LAYOUT_PAIRS = 16  # timed pairs of calls (packed, plain) that decide a shape's layout
# packed is kept unless the plain weight is this much faster: one layout serves every row
# count of more than one, and a trial sees mostly the first it meets (on a Zen 4 EPYC packed
# takes 0.59-0.73 of plain's time at 4 and 32 rows; at one row, which does not take part,
# the two are within 10% of each other: 2048 x 512 plain 0.183 ms, packed 0.202)
LAYOUT_MARGIN = 1.1
# a layer's calls with one row: its own way (kernel and layout as chosen) or RowBlocks over a
# row-major copy, which must win by ROW_MAJOR_WIN: it holds the matrix a second time
ONE_ROW = ("own", "row-major")
ROW_MAJOR_WIN = 1.1
LAYOUT_LAYERS = 4  # layers of a shape and row bucket that try both layouts (each holds both
# meanwhile: the benchmark model's 60 512 x 512 layers all at once took 270 MB more at the
# peak); per bucket, so that layers called every step take part, not only the encoder's
# int8 products: fbgemm's (torch.ops.quantized) and oneDNN's (torch.ops.onednn, which packs the
# matrix alone where torch.ops.quantized's oneDNN engine also keeps it as it was)
INT8_ENGINES = (("fbgemm",) if "fbgemm" in torch.backends.quantized.supported_engines else ()) + (
    ("onednn",) if torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.onednn, "qlinear_pointwise") else ())
TIMED_CALLS = 7  # per kernel, after one untimed call. A choice is for good: with 3, the
# 58k x 512 output layer's at one row (calls of 5 ms, so 3 ended its trial) went to MKL, 1.2-1.4x
# as slow as split2, in 2 of 7 first runs on a fresh cache, every other trial running beside it
# (float32 W1 of benchmarks/, Zen 4 EPYC); 6 of 6 runs with only its choice cleared, and 8 of 8
# fresh ones with 7, took split2 or split8 (as fast). Calls under 0.43 ms took 7 or more already
TRIAL_SECONDS = 0.003  # per kernel on trial, at least (about 30 calls of a 512 x 512 layer)
TRIAL_CALLS = 48  # or this many calls, where 3 ms takes more


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


class Trial:
    """Kernels tried in turn on real calls: each call runs the kernel with the fewest timings
    so far. A kernel's first call in a process is not counted (set-up: oneDNN builds its
    primitive for a new shape there); then each is timed on at least TIMED_CALLS calls and
    TRIAL_SECONDS or TRIAL_CALLS, so that calls of 0.1 ms, whose times scatter by a third,
    are compared on a few dozen. Timings carry over to the next process (Chooser), so that
    one-sentence runs, each too short to finish a trial, finish one together."""

    def __init__(self, names: tuple[str, ...], seconds: dict[str, list[float]] | None = None):
        self.seconds = {name: list((seconds or {}).get(name, [])) for name in names}
        self.warm: set[str] = set()  # kernels already called in this process

    def next(self) -> str:
        return min(self.seconds, key=lambda name: len(self.seconds[name]))

    def record(self, name: str, seconds: float) -> None:
        if name in self.warm:
            self.seconds[name].append(seconds)
        self.warm.add(name)

    def winner(self, handicap: dict[str, float] = {}) -> str | None:
        """The kernel with the least median time (multiplied by its handicap: what it must win
        by), once every kernel has been timed enough."""
        if any(len(s) < TIMED_CALLS or (sum(s) < TRIAL_SECONDS and len(s) < TRIAL_CALLS)
               for s in self.seconds.values()):
            return None
        return min(self.seconds, key=lambda name: statistics.median(self.seconds[name])
                   * handicap.get(name, 1.0))


class Chooser:
    """Kernel names by (out, in, row bucket), measured where missing, kept in `path` with
    the timings of unfinished trials."""

    def __init__(self, path: Path | None, forced: str | None = None,
                 names: tuple[str, ...] = tuple(KERNELS), handicap: dict[str, float] = {},
                 threads: int | None = None):
        self.path, self.forced, self.names, self.handicap = path, forced, names, handicap
        # the choices hold for this many threads (this process's, unless told)
        self.threads = torch.get_num_threads() if threads is None else threads
        self.table: dict[str, str] = {}
        self.unsure: set[str] = set()  # measured on a busy machine: not kept
        self.trials: dict[str, Trial] = {}
        self.ratios: dict[str, list[float]] = {}  # pairwise trials (layout, one row): time ratios
        self.enlisted: dict[str, int] = {}  # pairwise trials: layers taking part, per key
        self.saves_at_exit = False
        if path is not None:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("kernels") == sorted(names):  # else kept before a kernel came
                    self.table = {k: v for k, v in data.get("choices", {}).items()
                                  if v in names or v in LAYOUTS and k.endswith("@layout")
                                  or v in ONE_ROW and k.endswith("@one-row")}
                    self.trials = {k: Trial(names, seconds)
                                   for k, seconds in data.get("trials", {}).items()}
                    self.ratios = {k: [float(r) for r in ratios]
                                   for k, ratios in data.get("layout_trials", {}).items()}
            except (OSError, ValueError, AttributeError, TypeError):
                pass  # none yet, or unreadable: measured again

    @staticmethod
    def key(weight_shape, rows: int) -> str:
        return f"{weight_shape[0]}x{weight_shape[1]}@{bucket(rows)}"

    def choose(self, key: str, measure: Callable[[], str]) -> str:
        """The name kept for `key`, or the one `measure()` finds."""
        if self.forced:
            return self.forced
        name = self.table.get(key)
        if name is None:
            name = measure()
            self.keep(key, name)
        return name

    def keep(self, key: str, name: str) -> None:
        """Record a measured choice; save it unless other processes were at work."""
        self.table[key] = name
        if busy(self.threads):
            self.unsure.add(key)
        else:
            self.save()

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None,
               by_name: dict[str, Kernel] | None = None) -> Tensor:
        """x W^T + b with the kernel chosen for this shape and row count, or, until there is
        one, the next kernel on trial, timed; the kernels by name from `by_name` (one for each
        of the chooser's names), else KERNELS."""
        by_name = KERNELS if by_name is None else by_name
        key = self.key(weight.shape, rows(x))
        name = self.forced or self.table.get(key)
        if name is not None:
            return by_name[name](x, weight, bias)
        trial = self.trials.get(key)
        if trial is None:
            trial = self.trials[key] = Trial(self.names)
        self.save_trials_at_exit()
        name = trial.next()
        start = time.perf_counter()
        out = by_name[name](x, weight, bias)
        trial.record(name, time.perf_counter() - start)
        winner = trial.winner(self.handicap)
        if winner is not None:
            del self.trials[key]
            self.keep(key, winner)
        return out

    def chosen_anywhere(self, weight_shape, name: str) -> bool:
        """Whether `name` is the kernel kept for this shape at some row count."""
        return any(self.table.get(self.key(weight_shape, 1 << b)) == name
                   for b in range(9))  # every bucket(): 1 to 256 rows

    def enlist(self, key: str) -> bool:
        """Whether one more layer may take part in the trial of `key` (a shape and row bucket,
        for its layout, or a one-row key)."""
        self.enlisted[key] = self.enlisted.get(key, 0) + 1
        return self.enlisted[key] <= LAYOUT_LAYERS

    def settled(self, weight_shape, rows: int) -> bool:
        """Whether this shape and row count has its kernel (no trial running)."""
        return self.key(weight_shape, rows) in self.table

    def layout(self, weight_shape) -> str | None:
        """"packed" or "plain" where decided for layers of this shape, else None. A forced
        kernel (TRANSLATE_KERNEL) multiplies the plain weight."""
        return "plain" if self.forced else self.table.get(self.layout_key(weight_shape))

    @staticmethod
    def layout_key(weight_shape) -> str:
        return f"{weight_shape[0]}x{weight_shape[1]}@layout"

    def compare_layouts(self, weight_shape, packed_s: float, plain_s: float) -> None:
        """One timed pair of a layer's calls at the same rows; after LAYOUT_PAIRS of the shape,
        packed is kept unless plain took less than 1 / LAYOUT_MARGIN of its time (median)."""
        self.compare(self.layout_key(weight_shape), packed_s, plain_s, LAYOUTS, LAYOUT_MARGIN)

    def one_row(self, weight_shape) -> str | None:
        """"own" or "row-major" where decided for one-row calls of this shape, else None. A
        forced kernel (TRANSLATE_KERNEL) serves them too."""
        return "own" if self.forced else self.table.get(self.one_row_key(weight_shape))

    @staticmethod
    def one_row_key(weight_shape) -> str:
        return f"{weight_shape[0]}x{weight_shape[1]}@one-row"

    def compare_one_row(self, weight_shape, own_s: float, row_major_s: float) -> None:
        """One timed pair of a layer's one-row calls; after LAYOUT_PAIRS of the shape, the
        row-major copy is kept where it took less than 1 / ROW_MAJOR_WIN of the own way's time."""
        self.compare(self.one_row_key(weight_shape), own_s, row_major_s, ONE_ROW, ROW_MAJOR_WIN)

    def compare(self, key: str, first_s: float, second_s: float, names: tuple[str, str],
                margin: float) -> None:
        """One timed pair of calls of the two ways `names` of `key`; after LAYOUT_PAIRS, the
        first is kept unless the second took less than 1 / margin of its time (median)."""
        ratios = self.ratios.setdefault(key, [])
        ratios.append(first_s / second_s)
        self.save_trials_at_exit()
        if len(ratios) >= LAYOUT_PAIRS:
            del self.ratios[key]
            self.keep(key, names[0] if statistics.median(ratios) < margin else names[1])

    def save_trials_at_exit(self) -> None:
        if not self.saves_at_exit and self.path is not None:
            atexit.register(self.save_trials)  # what this process timed, for the next
            self.saves_at_exit = True

    def save_trials(self) -> None:
        """Keep the timings of unfinished trials, unless other processes are at work."""
        if (self.trials or self.ratios) and not busy(self.threads):
            self.save()

    def save(self) -> None:
        if self.path is None:
            return
        try:  # a cache that cannot be written only costs measuring again next time
            with written_whole(self.path, "w", encoding="utf-8") as f:
                json.dump({"cpu": cpu_name(), "torch": torch.__version__,
                           "threads": self.threads, "kernels": sorted(self.names),
                           "choices": {k: v for k, v in self.table.items()
                                       if k not in self.unsure},
                           "trials": {k: {name: [round(s, 7) for s in seconds]
                                          for name, seconds in trial.seconds.items()}
                                      for k, trial in self.trials.items()},
                           "layout_trials": {k: [round(r, 4) for r in ratios]
                                             for k, ratios in self.ratios.items()}}, f,
                          indent=1, sort_keys=True)
        except OSError:
            pass


# the tied output layer's packed copy of its matrix (core.precision.TiedOutput) must be this
# much faster to be chosen: it holds the matrix a second time (119 MB for 58k x 512), and its
# blocks' copy into the logits costs beyond its own call (Zen 4 EPYC, 2 threads: chosen at
# 128 rows by timings 5-10% faster, beam search over 32 sentences ran 3.5% slower)
PACKED_WIN = 1.15
# per family: the choices' names, the variable that forces one, the cache file's suffix, the
# handicaps; "output" is the tied output layer's, which may also read its packed copy
FAMILIES = {"float32": (tuple(KERNELS), "TRANSLATE_KERNEL", "", {}),
            "output": (tuple(KERNELS) + ("packed",) * PACKABLE, "TRANSLATE_KERNEL", "-output",
                       {"packed": PACKED_WIN}),
            # "-int8b": choices made before oneDNN's int8 layers stopped holding their matrix
            # twice, under a handicap for it, are void
            "int8": (INT8_ENGINES, "TRANSLATE_INT8_KERNEL", "-int8b", {})}
_choosers: dict[str, Chooser] = {}


def chooser(family: str = "float32", threads: int | None = None) -> Chooser:
    """The process's Chooser for `family`, made on first use for the current thread count;
    with `threads`, the choices of processes of that many threads (read from their file, and
    kept as the process's only if that is its own count)."""
    names, variable, suffix, handicap = FAMILIES[family]
    own = torch.get_num_threads()
    threads = own if threads is None else threads
    found = _choosers.get(family)
    if found is None or found.threads != threads:
        forced = os.environ.get(variable) or None
        if forced is not None and forced not in names:
            from core.errors import UsageError

            raise UsageError(f"{variable}={forced}: choose from {', '.join(names)}")
        slug = re.sub(r"[^\w.-]+", "_", cpu_name()).strip("_")[:80]
        path = cache_root() / "kernels" / f"{slug}-torch{torch.__version__}-t{threads}{suffix}.json"
        found = Chooser(path, forced, names, handicap, threads)
        if threads == own:
            _choosers[family] = found
    return found


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear with the kernel chosen for this shape and row count on this machine."""
    return chooser().linear(x, weight, bias)
