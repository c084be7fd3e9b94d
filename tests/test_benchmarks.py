"""The benchmark scripts stay runnable: every module imports (benchmarks.limits once imported a
function that benchmarks.run no longer had), the memory bound counts the bytes decoding
reads, and sampling memory never slows a timed pass."""

import importlib
import json
import pkgutil
import threading

import pytest
import torch

import benchmarks
from benchmarks import engines
from benchmarks.limits import STEPS, memory_bound
from benchmarks.workloads import WORKLOADS


@pytest.mark.parametrize("name", [m.name for m in pkgutil.iter_modules(benchmarks.__path__)])
def test_every_benchmark_module_imports(name):
    importlib.import_module(f"benchmarks.{name}")


def test_memory_bound_reads_encoder_once_and_decoder_every_step():
    def megabyte():  # 2**18 float32 = 1 MiB
        return torch.empty(1 << 18)

    w = {"encoder": [[megabyte()]], "cross_kv": [[megabyte()]], "decoder": [[megabyte()]],
         "head": megabyte()}
    workload = WORKLOADS["W1"]  # one batch
    mb = 1 << 20
    seconds = (2 * mb + STEPS * 2 * mb) / 1e9  # at 1 GB/s
    assert memory_bound(w, workload, 1.0) == pytest.approx(workload.output_tokens / seconds)


def test_workers_memory_is_sampled_on_untimed_passes_only(monkeypatch, capsys):
    """A -w2 run's memory sampler (a few % of a core) runs during the warm-up and one pass
    after the timed ones, never during a timed pass, and its peak is the one reported."""
    active = threading.Event()
    sampled = []  # per pass: whether the sampler was on

    def run(batches):
        sampled.append(active.is_set())
        return [engines.NEW_TOKENS] * sum(len(b) for b in batches)

    class Sampler:
        def __init__(self):
            self.active = active

        def peak_kib(self):
            return 300 << 10

    run.load_s, run.whole, run.sampler = 0.0, True, Sampler()
    monkeypatch.setitem(engines.LOADERS, "ours", lambda *args: run)
    engines.main(["ours", "int8-w2", "W3", "--repeats", "3"])
    assert sampled == [True, False, False, False, True]
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["peak_rss_mb"] == 300 and summary["tokens_ok"]
