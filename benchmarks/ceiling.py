"""How fast exact float32 decoding can be on this machine: the matrix products alone.

    python -m benchmarks.ceiling [--repeats N]

For each workload, times only the float32 matrix products that decoding the benchmark model
must do, with torch's GEMM (MKL) on 2 threads and random weights of the model's shapes (read
from its config; the model is built first if needed), one matrix per layer as in the real model:
- the encoder's six products per layer, over the real source tokens only (no padding);
- every decoder layer's cross-attention keys and values, once per batch;
- per step, for every live row (sentences x beams), each decoder layer's eight products and the
  58,101-way output layer; 31 steps (30 tokens, then end-of-sentence), as every engine runs.
Attention, softmax, layer norm, search and Python are left out, so no float32 engine that
computes the exact function on this machine beats these tokens/s; 2x transformers float32 is
out of reach where the ceiling is below it. Each pass runs in both weight layouts (row-major
as transformers keeps them, column-major as ours does) and the faster counts.
Transformers and ours run (each in its own process) right before their row, for the ratios."""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.engines import THREADS, torch_threads
from benchmarks.run import log, run_engine
from benchmarks.workloads import NEW_TOKENS, OURS, WORKLOADS

STEPS = NEW_TOKENS + 1  # the last step produces end-of-sentence


def weights(torch, cfg, column_major: bool) -> dict:
    """(out, in) matrices per role and layer, in the layout asked for."""
    D, FF = cfg.d_model, cfg.d_ff

    def matrix(rows, cols):
        w = torch.randn(rows, cols)
        return w.t().contiguous().t() if column_major else w

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


def products(torch, cfg, w: dict, workload) -> float:
    """Seconds for one pass of the workload's matrix products."""
    F = torch.nn.functional
    D, FF = cfg.d_model, cfg.d_ff
    inputs = []  # made before the clock starts: (n, D) and (n, FF) for n tokens, then rows
    for batch in workload.batches:
        tokens, rows = sum(len(s) for s in batch), len(batch) * workload.beam
        inputs.append([(torch.randn(n, D), torch.randn(n, FF)) for n in (tokens, rows)])
    start = time.perf_counter()
    for (x, x_inner), (h, h_inner) in inputs:
        for layer in w["encoder"]:
            for m in layer:
                F.linear(x if m.size(1) == D else x_inner, m)
        for layer in w["cross_kv"]:
            for m in layer:
                F.linear(x, m)
        for _ in range(STEPS):
            for layer in w["decoder"]:
                for m in layer:
                    F.linear(h if m.size(1) == D else h_inner, m)
            F.linear(h, w["head"])
    return time.perf_counter() - start


def ceiling(torch, cfg, workload, repeats: int, layouts: dict) -> float:
    """Output tokens/s of the faster layout's median pass, after a warm-up pass each."""
    best = 0.0
    for w in layouts.values():
        products(torch, cfg, w, workload)
        seconds = statistics.median(products(torch, cfg, w, workload) for _ in range(repeats))
        best = max(best, workload.output_tokens / seconds)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceiling")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes [5]")
    args = parser.parse_args(argv)
    from benchmarks import model
    from core.config import ModelConfig

    torch = torch_threads()  # before the build, which may run torch
    model.build()
    cfg = ModelConfig.load(OURS / "config.json")
    torch.manual_seed(0)
    layouts = {"row-major": weights(torch, cfg, False), "column-major": weights(torch, cfg, True)}

    print(f"Float32 matrix products only, {THREADS} threads, output tokens/s:\n")
    print("| workload | products only | transformers fp32 | ours fp32 | products only / "
          "transformers | ours / transformers |")
    print("|---|---|---|---|---|---|")
    for name, workload in WORKLOADS.items():
        log(f"{name}: transformers, ours, products only")
        tf, ours = (run_engine(engine, "float32", name, None).get("tok_s", float("nan"))
                    for engine in ("transformers", "ours"))
        top = ceiling(torch, cfg, workload, args.repeats, layouts)
        print(f"| {name} | {top:.1f} | {tf:.1f} | {ours:.1f} | {top / tf:.2f}x | "
              f"{ours / tf:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
