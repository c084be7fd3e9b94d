"""The benchmark scripts stay runnable: every module imports (benchmarks.limits once imported a
function that benchmarks.run no longer had), and the memory bound counts the bytes decoding
reads."""

import importlib
import pkgutil

import pytest
import torch

import benchmarks
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
