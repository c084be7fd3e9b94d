"""One benchmark run in its own process, so that peak RSS and load time belong to one engine:

    python -m benchmarks.engines ENGINE MODE WORKLOAD [--repeats N]

prints one JSON line: engine, mode, workload, load_s, tok_s (median output tokens/s over the
timed passes), peak_rss_mb, tokens_ok. Each engine imports only what it needs: the ct2 engine
never imports torch or transformers.

With --serve, the process loads and warms up, prints {"ready": true}, then takes one timed
pass for each line "pass" on stdin (answering {"seconds": ..., "ok": ...}) and, at the end of
its input, prints the same summary line. benchmarks.run drives one such process per engine
and takes their passes in turn, so that the engines of a row see the same spells of a shared
machine.

A pass decodes every batch of the workload with exactly NEW_TOKENS output tokens per sentence
(minimum = maximum length), so all engines do the same amount of work whatever the random
weights prefer."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.workloads import CT2, EOS, MARIAN, NEW_TOKENS, OURS, PAD, WORKLOADS

if TYPE_CHECKING:
    from benchmarks.workloads import Workload

THREADS = 2
# a mode is a precision, and for the throughput workloads (W3, W4) a way to run in parallel:
# "-best" is CTranslate2's best configuration on a 2-core machine (1 intra thread x 2 inter
# threads for batches, 1 thread for a single sentence), "-w2" ours with --workers 2 (two
# forked processes of one thread each, sharing the weights); both see the whole workload at
# once, as translate_batch and --workers do, and neither applies to a single sentence's W1/W2
MODES = {"transformers": ("float32", "bfloat16"),
         "ct2": ("float32", "int8_float32", "float32-best", "int8_float32-best"),
         "ours": ("float32", "bfloat16", "float16", "int8", "float32-w2", "int8-w2")}

# a runner decodes one batch (a tuple of id tuples) and returns each sentence's output length
Runner = Callable[[tuple[tuple[int, ...], ...]], list[int]]


def torch_threads():
    import torch

    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)  # must come before any parallel work
    return torch


def padded(torch, batch):
    """Right-padded (B, S) ids and the boolean mask of real tokens."""
    width = max(len(s) for s in batch)
    src = torch.tensor([list(s) + [PAD] * (width - len(s)) for s in batch], dtype=torch.long)
    return src, src != PAD


def load_transformers(mode: str, beam: int) -> Runner:
    torch = torch_threads()
    import transformers

    start = time.perf_counter()
    model = transformers.MarianMTModel.from_pretrained(MARIAN).eval()
    if mode == "bfloat16":
        model = model.to(torch.bfloat16)
    load_s = time.perf_counter() - start  # the model only, not the library imports

    def run(batch):
        src, mask = padded(torch, batch)
        with torch.inference_mode():
            out = model.generate(input_ids=src, attention_mask=mask.long(), num_beams=beam,
                                 do_sample=False, min_new_tokens=NEW_TOKENS,
                                 max_new_tokens=NEW_TOKENS, num_return_sequences=1)
        # (B, 1 + new): the decoder start token, then the new tokens; rows that ended early
        # would be padded, so a row holding EOS counts as wrong
        new = out[:, 1:]
        return [new.size(1) if not (row == EOS).any() else -1 for row in new]

    run.load_s, run.whole = load_s, False
    return run


def load_ct2(mode: str, beam: int, single: bool = False) -> Runner:
    import ctranslate2

    mode, _, variant = mode.partition("-")
    intra, inter = ((1, 1) if single else (1, 2)) if variant == "best" else (THREADS, 1)

    # ids -> the pieces CTranslate2 takes; its vocabulary is vocab.json's order (without the
    # last entry, <pad>, which it drops because its decoder starts from a zero vector)
    vocab = json.loads((MARIAN / "vocab.json").read_text(encoding="utf-8"))
    pieces = [piece for piece, _ in sorted(vocab.items(), key=lambda item: item[1])]
    start = time.perf_counter()
    translator = ctranslate2.Translator(str(CT2), device="cpu", compute_type=mode,
                                        intra_threads=intra, inter_threads=inter)
    load_s = time.perf_counter() - start  # the model only, not the library imports

    def run(batch):
        # sources keep their </s>: the converted Marian model does not add it (add_source_eos
        # is false), just as opus-mt's tokenizer output ends with it
        if variant == "best":  # the whole workload: inter threads take batches of 32 each
            batch = [s for b in batch for s in b]
        source = [[pieces[i] for i in s] for s in batch]
        # max_decoding_length counts decoding steps: an EOS would take one, but EOS is banned
        # for the first min_decoding_length steps, so each hypothesis is exactly 30 pieces
        results = translator.translate_batch(
            source, beam_size=beam, max_decoding_length=NEW_TOKENS,
            min_decoding_length=NEW_TOKENS, max_batch_size=32)
        return [len(r.hypotheses[0]) if "</s>" not in r.hypotheses[0] else -1
                for r in results]

    run.load_s, run.whole = load_s, variant == "best"
    return run


def load_ours(mode: str, beam: int, single: bool = False) -> Runner:
    from core.machine import reuse_freed_memory

    reuse_freed_memory()  # the process setting the command line makes
    torch = torch_threads()
    from core import checkpoint
    from core.generate import generate
    from core.search import DecodeOptions

    mode, _, variant = mode.partition("-")
    start = time.perf_counter()
    ckpt = checkpoint.load(str(OURS), "cpu", dtype=mode)
    load_s = time.perf_counter() - start  # the model only, not the library imports
    options = DecodeOptions(strategy="greedy" if beam == 1 else "beam", beam_size=beam,
                            length_penalty=1.0, min_length=NEW_TOKENS, max_length=NEW_TOKENS)

    def run(batch):
        src, mask = padded(torch, batch)
        hyps = {}
        # EOS is banned for 30 steps and forced at the 31st; Hypothesis.tokens excludes it
        for step in generate(ckpt.model, src, mask, options.make(eos_id=EOS),
                             max_length=NEW_TOKENS, min_length=NEW_TOKENS):
            hyps.update(step.finished)
        return [len(hyps[i][0].tokens) if i in hyps else -1 for i in range(len(batch))]

    run.load_s, run.whole = load_s, variant == "w2"
    if variant != "w2":
        return run
    import multiprocessing

    # forked after the load, as --workers does: the workers share the weights (and find the
    # runner in this module's global, which a closure cannot be pickled into)
    global _RUN
    _RUN = run
    from core.precision import before_fork

    before_fork(ckpt.model, threads=1)
    pool = multiprocessing.get_context("fork").Pool(2, initializer=torch.set_num_threads,
                                                    initargs=(1,))

    def in_workers(batches):
        return [n for lengths in pool.map(_run_in_worker, batches, chunksize=1)
                for n in lengths]

    in_workers.load_s, in_workers.whole = load_s, True
    in_workers.sampler = PeakMemory(lambda: [os.getpid(), *(p.pid for p in pool._pool)])
    return in_workers


class PeakMemory:
    """The peak of the memory that a group of processes holds together, sampled every 250 ms:
    the sum of their PSS (shared pages shared out, so the weights the forked workers share
    count once), or the parent's own VmHWM if that was higher (the load, before the workers).
    Each process's VmHWM alone would miss the workers, and their sum count the weights thrice.
    It samples only while `active` is set: during the untimed passes (main()). A sample costs a
    few % of a core: sampling the timed passes slowed them (int8-w2 W3, one process switching
    on and off: 1.021x and 1.047x as fast off), and would slow the other engines' passes while
    this one waits its turn."""

    def __init__(self, pids: Callable[[], list[int]]):
        import threading

        self.pids, self.peak = pids, 0
        self.active = threading.Event()
        threading.Thread(target=self.sample, daemon=True).start()

    def sample(self) -> None:
        while self.active.wait():
            total = 0
            for pid in self.pids():
                try:
                    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
                except OSError:
                    continue
                total += sum(int(line.split()[1]) for line in rollup.splitlines()
                             if line.startswith("Pss:"))
            self.peak = max(self.peak, total)
            time.sleep(0.25)  # a sample reads 3 ms per 400 MB: a few % of a core

    def peak_kib(self) -> int:
        return max(self.peak, peak_rss_kib())


_RUN: Runner | None = None


def _run_in_worker(batch):
    return _RUN(batch)


LOADERS = {"transformers": load_transformers, "ct2": load_ct2, "ours": load_ours}


def peak_rss_kib() -> int:
    """This process's peak resident memory: VmHWM, which starts afresh with the process's own
    address space. Not ru_maxrss: Linux carries that across exec, so a child of a large
    parent (the runner that built the model) reads the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: KiB or bytes


def one_pass(run: Runner, workload: Workload) -> tuple[float, bool]:
    """Wall time of decoding the whole workload, and whether every sentence got 30 tokens."""
    ok = True
    start = time.perf_counter()
    for batch in [workload.batches] if run.whole else workload.batches:
        ok &= all(n == NEW_TOKENS for n in run(batch))
    return time.perf_counter() - start, ok


def default_repeats(workload: Workload) -> int:
    """Timed passes when none are asked for: 5 for one sentence (W1, W2), 3 for the batches."""
    return 5 if workload.sentences == 1 else 3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engines")
    parser.add_argument("engine", choices=sorted(MODES))
    parser.add_argument("mode")
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--repeats", type=int, help="timed passes [default: 5 for W1/W2, "
                        "3 for W3/W4]")
    parser.add_argument("--serve", action="store_true", help="a timed pass for each line "
                        "'pass' on stdin, instead of --repeats")
    args = parser.parse_args(argv)
    if args.mode not in MODES[args.engine]:
        parser.error(f"{args.engine} modes: {', '.join(MODES[args.engine])}")
    workload = WORKLOADS[args.workload]
    repeats = args.repeats or default_repeats(workload)

    single = workload.sentences == 1
    if single and args.mode.endswith("-w2"):
        parser.error("workers translate batches side by side: not for one sentence (W1/W2)")
    loader = LOADERS[args.engine]
    run = (loader(args.mode, workload.beam, single) if args.engine != "transformers"
           else loader(args.mode, workload.beam))

    sampler = getattr(run, "sampler", None)  # -w2: memory sampled on untimed passes only
    with sampling(sampler):
        _, ok = one_pass(run, workload)  # warm-up: first-call allocations, lazy init
    speeds = []

    def timed_pass() -> dict:
        nonlocal ok
        seconds, good = one_pass(run, workload)
        ok &= good
        speeds.append(workload.output_tokens / seconds)
        return {"seconds": round(seconds, 4), "ok": good}

    if args.serve:
        say({"ready": True})
        for line in sys.stdin:
            if line.strip() == "pass":
                say(timed_pass())
    else:
        for _ in range(repeats):
            timed_pass()

    if sampler is not None:  # memory once more, after what the timed passes left behind
        with sampling(sampler):
            one_pass(run, workload)
    peak_kib = sampler.peak_kib() if sampler is not None else peak_rss_kib()
    say({"engine": args.engine, "mode": args.mode, "workload": args.workload,
         "load_s": round(run.load_s, 3),
         "tok_s": round(statistics.median(speeds), 2) if speeds else 0.0,
         "peak_rss_mb": round(peak_kib / 1024, 1), "tokens_ok": ok and bool(speeds)})


@contextmanager
def sampling(sampler: PeakMemory | None):
    """`sampler` samples (if any) while inside."""
    if sampler is not None:
        sampler.active.set()
    try:
        yield
    finally:
        if sampler is not None:
            sampler.active.clear()


def say(record: dict) -> None:
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
