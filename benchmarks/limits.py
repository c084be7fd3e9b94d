"""Two bounds on float32 decoding here: what memory bandwidth allows, and what the matrix
products alone take with the kernels this machine chose.

    python -m benchmarks.limits [--repeats N]

- **Memory** (the physical bound): a probe times summing a 1 GiB float32 array on 2 threads
  (GB/s). Decoding one batch must read every encoder weight once, the cross-attention's key
  and value weights once, and every decoder weight and the 58,101-way output layer once per
  step (31 steps), whatever the kernel; bytes / bandwidth bounds the tokens/s from above.
- **Products only**: times the float32 matrix products that decoding the benchmark model must
  do, with random weights of the model's shapes, column-major, through core.kernels (the kernel
  it chose per shape and row count, as our model runs them): the encoder's six products per
  layer over the real source tokens, every decoder layer's cross-attention keys and values
  once per batch, and per step, for every live row (sentences x beams), each decoder layer's
  eight products and the output layer. Attention, softmax, layer norm, search and Python are
  left out. This is not a machine limit: another library's kernels may be faster (CTranslate2
  float32 is, on some CPUs).

Transformers and ours run right before their row, for the ratios: each in its own process, their
timed passes taken in turn (benchmarks.run.run_row)."""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.engines import THREADS, torch_threads
from benchmarks.run import log, run_row
from benchmarks.workloads import NEW_TOKENS, OURS, WORKLOADS

STEPS = NEW_TOKENS + 1  # the last step produces end-of-sentence


def weights(torch, cfg) -> dict:
    """(out, in) matrices per role and layer, column-major as our float32 model keeps them."""
    D, FF = cfg.d_model, cfg.d_ff

    def matrix(rows, cols):
        return torch.randn(rows, cols).t().contiguous().t()

    return {
        # self-attention q k v out, fc1, fc2
        "encoder": [[*(matrix(D, D) for _ in range(4)), matrix(FF, D), matrix(D, FF)]
                    for _ in range(cfg.n_encoder_layers)],
        "cross_kv": [[matrix(D, D), matrix(D, D)] for _ in range(cfg.n_decoder_layers)],
        # self-attention q k v out, cross-attention q out, fc1, fc2
        "decoder": [[*(matrix(D, D) for _ in range(6)), matrix(FF, D), matrix(D, FF)]
                    for _ in range(cfg.n_decoder_layers)],
        "head": matrix(cfg.vocab_size, D),
    }


def bandwidth(torch, repeats: int) -> float:
    """GB/s of reading a 1 GiB float32 array (the fastest of `repeats` sums)."""
    data = torch.ones(1 << 28)
    data.sum()
    best = min(_timed(data.sum) for _ in range(repeats))
    return data.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def memory_bound(w: dict, workload, gb_s: float) -> float:
    """Output tokens/s if decoding did nothing but read its weights at `gb_s`."""
    def size(ms):
        return sum(m.numel() * 4 for m in ms)

    once = size([m for layer in w["encoder"] + w["cross_kv"] for m in layer])
    per_step = size([m for layer in w["decoder"] for m in layer] + [w["head"]])
    seconds = len(workload.batches) * (once + STEPS * per_step) / (gb_s * 1e9)
    return workload.output_tokens / seconds


def products(torch, cfg, w: dict, workload) -> float:
    """Seconds for one pass of the workload's matrix products."""
    from core.kernels import linear

    D, FF = cfg.d_model, cfg.d_ff
    inputs = []  # made before the clock starts: (n, D) and (n, FF) for n tokens, then rows
    for batch in workload.batches:
        tokens, rows = sum(len(s) for s in batch), len(batch) * workload.beam
        inputs.append([(torch.randn(n, D), torch.randn(n, FF)) for n in (tokens, rows)])
    start = time.perf_counter()
    for (x, x_inner), (h, h_inner) in inputs:
        for layer in w["encoder"]:
            for m in layer:
                linear(x if m.size(1) == D else x_inner, m)
        for layer in w["cross_kv"]:
            for m in layer:
                linear(x, m)
        for _ in range(STEPS):
            for layer in w["decoder"]:
                for m in layer:
                    linear(h if m.size(1) == D else h_inner, m)
            linear(h, w["head"])
    return time.perf_counter() - start


def products_only(torch, cfg, w: dict, workload, repeats: int) -> float:
    """Output tokens/s of the median pass, after a warm-up pass (in which core.kernels tries
    its kernels on any shape and row count it has not met on this machine)."""
    products(torch, cfg, w, workload)
    seconds = statistics.median(products(torch, cfg, w, workload) for _ in range(repeats))
    return workload.output_tokens / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.limits")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes [5]")
    args = parser.parse_args(argv)
    from benchmarks import model
    from core.config import ModelConfig
    from core.kernels import cpu_name

    torch = torch_threads()  # before the build, which may run torch
    model.build()
    cfg = ModelConfig.load(OURS / "config.json")
    torch.manual_seed(0)
    w = weights(torch, cfg)
    gb_s = bandwidth(torch, args.repeats)

    print(f"{cpu_name()}, {THREADS} threads: memory reads {gb_s:.1f} GB/s. Float32 output "
          "tokens/s:\n")
    print("| workload | memory bound | products only | transformers fp32 | ours fp32 | "
          "ours / transformers | ours / memory bound |")
    print("|---|---|---|---|---|---|---|")
    for name, workload in WORKLOADS.items():
        log(f"{name}: transformers, ours, products only")
        tf, ours = (run.get("tok_s", float("nan")) for run in run_row(
            [("transformers", "float32"), ("ours", "float32")], name, args.repeats))
        bound = memory_bound(w, workload, gb_s)
        top = products_only(torch, cfg, w, workload, args.repeats)
        print(f"| {name} | {bound:.0f} | {top:.1f} | {tf:.1f} | {ours:.1f} | {ours / tf:.2f}x | "
              f"{ours / bound:.0%} |", flush=True)


if __name__ == "__main__":
    main()
