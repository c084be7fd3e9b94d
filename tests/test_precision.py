"""Inference in bfloat16, float16 and int8, and float32 with the kernel measured fastest: what
--dtype changes, that loading holds no second copy, and that the translation survives it."""

import copy
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import TEXTS, tiny_model
from torch import nn
from typer.testing import CliRunner

from cli.main import app
from core import checkpoint, kernels, machine, precision
from core.errors import UsageError
from core.generate import generate
from core.precision import (Float16Embeddings, Float16Linear, Int8Embeddings, Int8Linear,
                            TunedLinear, quantize_rows)
from core.search import DecodeOptions
from core.translator import Translator

ENGLISH = TEXTS[0::2]


needs_onednn = pytest.mark.skipif(not Int8Linear.MOVABLE,
                                  reason="torch has no oneDNN and fbgemm int8 engines here")


@pytest.mark.parametrize("engine", ["fbgemm", pytest.param("onednn", marks=needs_onednn)])
@pytest.mark.parametrize("shape", [(5, 48), (3, 1, 48), (2, 7, 48), (0, 48)])
def test_int8_linear_is_close_to_float32(shape, engine):
    """An Int8Linear computes the float32 layer to within int8 rounding (1-2%), with or
    without a bias, for inputs of any leading shape, in either engine."""
    torch.manual_seed(0)
    linear = nn.Linear(48, 200)
    x = torch.randn(shape)
    for bias in (linear.bias, None):
        want = nn.functional.linear(x, linear.weight, bias)
        layer = Int8Linear.from_float(linear.weight, bias)
        if engine == "onednn":
            layer.move_to_onednn()
        got = layer(x)
        assert got.shape == want.shape
        if want.numel():
            assert (got - want).abs().mean() < 0.03 * want.abs().mean()


def test_float32_on_cpu_reads_matrices_column_major(model_dir, model, tokenizer, tmp_path,
                                                    monkeypatch):
    """The layout MKL multiplies fastest, chosen at load time: same values, same logits, and
    saved again, the same file."""
    monkeypatch.setitem(kernels._choosers, "float32", kernels.Chooser(None))  # nothing packed
    loaded = checkpoint.load(str(model_dir), "cpu").model
    for name in ("embed.weight", "decoder.0.cross_attn.q_proj.weight", "encoder.1.ffn.fc2.weight"):
        weight = loaded.get_parameter(name)
        assert weight.t().is_contiguous() and not weight.is_contiguous(), name
        assert torch.equal(weight, model.get_parameter(name)), name
    src = torch.randint(4, model.cfg.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(src, dtype=torch.bool)
    with torch.inference_mode():  # the kernels on trial sum in other orders: float rounding
        torch.testing.assert_close(loaded(src, mask, src), model(src, mask, src),
                                   rtol=1e-4, atol=1e-4)
    checkpoint.save(loaded, tokenizer, tmp_path)
    weights = checkpoint.WEIGHTS
    assert (tmp_path / weights).read_bytes() == (model_dir / weights).read_bytes()


def test_float32_on_cpu_projects_self_attention_in_one_product_saved_as_three(model_dir, model):
    """Each self-attention's q, k and v come from one product; cached decoding with it gives
    the unfused model's logits, and its state dict is the checkpoint's, name for name."""
    loaded = checkpoint.load(str(model_dir), "cpu").model
    for layer in [*loaded.encoder, *loaded.decoder]:
        assert isinstance(layer.self_attn.qkv, precision.FusedProjection)
        assert layer.self_attn.q_proj is None
    assert loaded.decoder[0].cross_attn.qkv is None  # its keys and values are the source's
    state = loaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    gen = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(4, model.cfg.vocab_size, (2, 2, 7), generator=gen)
    mask = torch.ones_like(src, dtype=torch.bool)
    with torch.inference_mode():
        full = model(src, mask, tgt)  # (B, T, V)
        cache = loaded.new_cache(loaded.encode(src, mask), mask)
        for t in range(tgt.size(1)):
            logits, cache = loaded.decode_step(tgt[:, t], cache)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-4)


def test_float32_on_cpu_folds_a_short_sentences_cross_attention(model_dir, model):
    """Loaded for float32 on a CPU, a short sentence decoded greedily gets folded cross K/V
    (read from the layers' tuned weights), and the unloaded model's logits."""
    loaded = checkpoint.load(str(model_dir), "cpu").model
    src = torch.randint(4, model.cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(4, model.cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(src, dtype=torch.bool)
    with torch.inference_mode():
        full = model(src, mask, tgt)  # (1, T, V)
        cache = loaded.new_cache(loaded.encode(src, mask), mask)
        assert cache.cross_bias is not None
        for t in range(tgt.size(1)):
            logits, cache = loaded.decode_step(tgt[:, t], cache)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-4)


def test_beam_search_over_a_short_sentence_folds_and_finds_the_same_hypotheses(model_dir,
                                                                              monkeypatch):
    """Loaded for float32 on a CPU, one short sentence decoded with beams gets folded cross
    K/V too, and the n-best list (tokens and scores) of the same model unfolded."""
    loaded = checkpoint.load(str(model_dir), "cpu").model
    made = []

    def new_cache(*args, **kwargs):
        cache = type(loaded).new_cache(loaded, *args, **kwargs)
        made.append(cache.cross_bias is not None)
        return cache

    monkeypatch.setattr(loaded, "new_cache", new_cache)
    src = torch.randint(4, loaded.cfg.vocab_size, (1, 4),
                        generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(src, dtype=torch.bool)
    options = DecodeOptions(strategy="beam", beam_size=3, n_best=3, max_length=8)

    def n_best() -> list:
        finished = {}
        for step in generate(loaded, src, mask, options.make(loaded.cfg.eos_id), max_length=8):
            finished.update(step.finished)
        return finished[0]

    folded = n_best()
    loaded.fold_source = False
    plain = n_best()
    assert made == [True, False]
    assert [h.tokens for h in folded] == [h.tokens for h in plain] and len(plain) == 3
    assert [h.score for h in folded] == pytest.approx([h.score for h in plain], abs=1e-4)


@pytest.mark.parametrize("shape", [(7, 5), (3000, 512)])  # under and over 2 MB pages
def test_the_tied_output_matrix_is_a_column_major_copy(shape):
    weight = torch.randn(shape)
    held = precision.column_major_in_huge_pages(weight)
    assert held.stride() == (1, shape[0]) and torch.equal(held, weight)
    assert held.data_ptr() != weight.data_ptr()


def test_int8_replaces_every_linear_layer_and_the_tied_output(model_dir):
    model = checkpoint.load(str(model_dir), "cpu", dtype="int8").model
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.embed, Int8Embeddings)  # no float32 table left
    per_layer = {"encoder": 4, "decoder": 8}  # qkv out fc1 fc2, and cross-attention's 4
    want = 2 * per_layer["encoder"] + 2 * per_layer["decoder"] + 1
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == want


def test_int8_self_attention_projects_q_k_and_v_in_one_product(model_dir):
    """Loaded in int8, each self-attention's q, k and v come from one layer, which computes
    what the three it joined did (to float rounding: x quantizes alike for all)."""
    torch.manual_seed(0)
    weights = [torch.randn(48, 32) for _ in range(3)]
    biases = [torch.randn(48) for _ in range(3)]
    parts = [Int8Linear.from_float(w, b) for w, b in zip(weights, biases)]
    x = torch.randn(5, 3, 32)
    with torch.inference_mode():
        want = torch.cat([p(x) for p in parts], -1)
        torch.testing.assert_close(Int8Linear.joined(parts)(x), want, rtol=1e-5, atol=1e-5)
    loaded = checkpoint.load(str(model_dir), "cpu", dtype="int8").model
    for layer in [*loaded.encoder, *loaded.decoder]:
        assert isinstance(layer.self_attn.qkv, Int8Linear) and layer.self_attn.q_proj is None
    assert loaded.decoder[0].cross_attn.qkv is None


def test_int8_embeddings_are_close_to_float32():
    full = tiny_model(40)
    tokens = torch.tensor([[5, 9, 39], [0, 1, 2]])
    want = full.embed(tokens)
    got = Int8Embeddings(*quantize_rows(full.embed.weight), full.embed.scale)(tokens)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 0.01 * want.abs().max()


def test_int8_output_layer_keeps_the_logits_bias():
    """Marian models add a bias to the tied output layer; the int8 head adds it in its kernel."""
    full = tiny_model(40, final_logits_bias=True)
    with torch.no_grad():
        full.logits_bias.copy_(torch.linspace(-5, 5, 40))
    reduced = precision.apply(copy.deepcopy(full), "int8", torch.device("cpu"))
    x = torch.randn(3, 2, full.cfg.d_model)
    with torch.inference_mode():
        want, got = full.project(x), reduced.project(x)
    assert (got - want).abs().mean() < 0.03 * want.abs().mean()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8"])
def test_reduced_precision_logits_follow_float32(model_dir, dtype):
    """Next-token distributions stay close to float32's (this random model's are flat, so
    near-ties make the arg-max a poor measure)."""
    full = checkpoint.load(str(model_dir), "cpu").model
    reduced = checkpoint.load(str(model_dir), "cpu", dtype=dtype).model
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, full.cfg.vocab_size, (6, 9), generator=g)
    tgt = torch.randint(4, full.cfg.vocab_size, (6, 7), generator=g)
    mask = torch.ones_like(src, dtype=torch.bool)
    with torch.inference_mode():
        want = full(src, mask, tgt).log_softmax(-1)
        got = reduced(src, mask, tgt).float().log_softmax(-1)
    distance = (got.exp() - want.exp()).abs().sum(-1).mean() / 2  # total variation
    # ~0.1 for int8 on this tiny model with sharpened embeddings; two random models are ~0.9
    assert distance < 0.2, distance


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8"])
def test_translator_in_reduced_precision(model_dir, dtype):
    """The whole path (beam search, cache, streaming) runs in bfloat16 and int8 and keeps
    one output line per input line. (Streaming is compared with a batch of one: int8
    activations share one scale per batch.)"""
    ckpt = checkpoint.load(str(model_dir), "cpu", dtype=dtype)
    reduced = Translator(ckpt.model, ckpt.tokenizer)
    options = dict(strategy="beam", beam_size=3, max_length=12)
    got = reduced.translate(ENGLISH + [""], **options)
    assert len(got) == len(ENGLISH) + 1 and got[-1] == ""
    alone = reduced.translate(ENGLISH[:1], **options)[0]
    assert "".join(reduced.stream(ENGLISH[0], **options)) == alone


def test_unknown_dtype_is_a_usage_error(model_dir):
    with pytest.raises(UsageError, match="unknown dtype 'int4'"):
        checkpoint.load(str(model_dir), "cpu", dtype="int4")


def test_stored_half_precision_weights_load_as_float32(model, tokenizer, tmp_path):
    checkpoint.save(model, tokenizer, tmp_path / "bf16", dtype=torch.bfloat16)
    loaded = checkpoint.load(str(tmp_path / "bf16"), "cpu").model
    assert loaded.embed.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.embed.weight, model.embed.weight.bfloat16().float())


def test_cli_dtype(model_dir):
    runner = CliRunner()
    ok = runner.invoke(app, ["-m", str(model_dir), "--dtype", "int8", "--max-length", "8",
                             "Hello", "there"], prog_name="translate")
    assert ok.exit_code == 0, ok.stderr
    assert ok.stdout.count("\n") == 1 and "error" not in ok.stderr
    bad = runner.invoke(app, ["-m", str(model_dir), "--dtype", "fp8", "Hello"],
                        prog_name="translate")
    assert bad.exit_code == 2 and bad.stdout == ""
    assert "unknown dtype 'fp8'" in bad.stderr and bad.stderr.count("\n") == 1


def test_bfloat16_on_a_cpu_without_its_arithmetic_is_said_to_be_slow(model_dir, monkeypatch):
    """A CPU without bfloat16 instructions converts every operation (a Zen 3 EPYC ran 5.7x
    slower than float32): one note on stderr says so, and the translation still comes."""
    def translate(dtype, flags):
        monkeypatch.setattr(machine, "cpu_flags", lambda: set(flags))
        result = CliRunner().invoke(app, ["-m", str(model_dir), "--dtype", dtype,
                                          "--max-length", "8", "Hello"], prog_name="translate")
        assert result.exit_code == 0, result.stderr
        assert result.stdout.count("\n") == 1
        return result.stderr

    said = [line for line in translate("bfloat16", {"fpu", "avx2", "fma"}).splitlines()
            if "bfloat16" in line]
    assert len(said) == 1 and said[0].startswith("note: this CPU has no bfloat16 arithmetic")
    assert "bfloat16" not in translate("bfloat16", {"avx2", "avx512_bf16"})
    assert "bfloat16" not in translate("bfloat16", {"avx2", "amx_bf16"})
    assert "bfloat16" not in translate("bfloat16", set())  # not x86: flags unknown
    assert "bfloat16" not in translate("float32", {"fpu", "avx2", "fma"})
    assert precision.slow("bfloat16", torch.device("cuda")) is None


def test_float16_keeps_half_precision_weights(model_dir):
    model = checkpoint.load(str(model_dir), "cpu", dtype="float16").model
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.embed, Float16Embeddings) and model.embed.table.dtype == torch.float16
    assert isinstance(model.lm_head, Float16Linear)  # tied: a packed copy of the table
    assert model.logits_bias is None or model.logits_bias.dtype == torch.float32


def test_float16_linear_is_float32_of_rounded_weights():
    torch.manual_seed(0)
    linear = nn.Linear(48, 200)
    x = torch.randn(3, 5, 48)
    want = nn.functional.linear(x, linear.weight.half().float(), linear.bias)
    torch.testing.assert_close(Float16Linear(linear.weight, linear.bias)(x), want,
                               rtol=1e-4, atol=1e-4)


def test_int8_matrices_are_read_in_slices(model_dir):
    """Loading int8 never reads a whole float32 matrix: each is quantized from row slices
    read from the file, so the float32 model is never in memory."""
    read, sliced = [], []
    real_read = checkpoint.TensorFile.read

    def spy(self, name, rows=slice(None)):
        (sliced if rows != slice(None) else read).append(name)
        return real_read(self, name, rows)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint.TensorFile, "read", spy)
        checkpoint.load(str(model_dir), "cpu", dtype="int8")
    matrices = {n for n in sliced}
    assert "embed.weight" in matrices and "decoder.1.ffn.fc2.weight" in matrices
    assert not [n for n in read if n in matrices]
    assert all(n.endswith((".bias", "norm.weight", "logits_bias")) for n in read), read


@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
def test_a_wide_int8_layer_goes_over_to_blocks_at_a_batch_and_computes_the_same(shared,
                                                                             monkeypatch):
    """The output layer is one packing for a decoding step's few rows (one call, where blocks
    take one each), and goes over to blocks of rows for good at its first batch, which would
    give fbgemm's int32 buffer the size of all its logits; every logit lands in its own
    column, as one packing computes it. Blocks come from the packing, or from the int8 matrix
    where it is shared (the tied output layer's embedding table)."""
    int8_chooser(monkeypatch, forced="fbgemm")  # stays with fbgemm
    monkeypatch.setattr(Int8Linear, "BLOCK", 16)
    torch.manual_seed(0)
    weight, bias = torch.randn(100, 32), torch.randn(100)
    layer = Int8Linear(*quantize_rows(weight), bias, shared=shared)
    whole = Int8Linear.from_float(weight, bias)
    few, batch = torch.randn(3, 5, 32), torch.randn(Int8Linear.ONEDNN_ROWS, 32)
    with torch.inference_mode():
        want_few, want_batch = whole.run(few, whole.packed), whole.run(batch, whole.packed)
        assert torch.equal(layer(few), want_few) and len(layer.packed) == 1
        torch.testing.assert_close(layer(batch), want_batch)
        assert len(layer.packed) == 7
        torch.testing.assert_close(layer(few), want_few)


def int8_chooser(monkeypatch, forced=None):
    chooser = kernels.Chooser(None, forced, kernels.INT8_ENGINES)
    monkeypatch.setitem(kernels._choosers, "int8", chooser)
    return chooser


@needs_onednn
@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
@pytest.mark.parametrize("block", [8192, 16])
def test_an_int8_layer_moves_to_onednn_for_batches_only_and_computes_the_same(block, shared,
                                                                           monkeypatch):
    """Forced to oneDNN, a layer stays with fbgemm for one sentence's rows and moves, whole,
    once a batch comes; its results agree to float rounding (the same quantization)."""
    int8_chooser(monkeypatch, forced="onednn")
    monkeypatch.setattr(Int8Linear, "ONEDNN_7_BITS", True)  # fbgemm's quantization exactly
    monkeypatch.setattr(Int8Linear, "BLOCK", block)
    torch.manual_seed(0)
    weight, bias = torch.randn(100, 48), torch.randn(100)
    layer = Int8Linear(*quantize_rows(weight), bias, shared=shared)
    kept = Int8Linear.from_float(weight, bias)
    few, batch = torch.randn(2, 3, 48), torch.randn(40, 48)
    with torch.inference_mode():
        want_few, want_batch = kept.run(few, kept.packed), kept.run(batch, kept.packed)
        assert torch.equal(layer(few), want_few) and layer.engine == "fbgemm"
        torch.testing.assert_close(layer(batch), want_batch, rtol=1e-5, atol=1e-4)
        assert layer.engine == "onednn" and len(layer.packed) == 1
        torch.testing.assert_close(layer(few), want_few, rtol=1e-5, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("winner", ["fbgemm", "onednn"])
def test_an_int8_engine_is_measured_on_the_layer_and_a_loser_changes_nothing(winner,
                                                                          monkeypatch):
    chooser = int8_chooser(monkeypatch)
    monkeypatch.setattr(Int8Linear, "ONEDNN_7_BITS", True)
    monkeypatch.setattr(kernels, "busy", lambda threads: False)
    timed = []
    monkeypatch.setattr(kernels, "fastest", lambda calls, handicap: timed.append(
        {name: call() for name, call in calls.items()}) or winner)
    monkeypatch.setattr(Int8Linear, "BLOCK", 16)
    torch.manual_seed(0)
    weight = torch.randn(100, 48)
    layer, kept = Int8Linear.from_float(weight), Int8Linear.from_float(weight)
    x = torch.randn(33, 48)
    with torch.inference_mode():
        out = layer(x)
        layer(x)
        torch.testing.assert_close(out, kept(x), rtol=1e-5, atol=1e-4)
    assert len(timed) == 1 and chooser.table == {"100x48@64": winner}  # measured once
    measured = timed[0]  # both engines ran this layer's weights at the bucket's rows
    assert measured["fbgemm"].shape == (64, 100)
    torch.testing.assert_close(measured["fbgemm"], measured["onednn"], rtol=1e-5, atol=1e-4)
    assert layer.engine == winner and len(layer.packed) == (7 if winner == "fbgemm" else 1)


@needs_onednn
def test_an_int8_layer_on_onednn_stays_close_to_float32(monkeypatch):
    """oneDNN's layers quantize activations to all 8 bits where the CPU sums int8 products in
    32 bits (VNNI, AMX), and to 7 where it sums pairs in 16 bits, which 8 bits would saturate
    (a Zen 3 EPYC: 4.7% mean error with 8): the bits this CPU gets keep the float32 layer to
    within int8 rounding, and 8 where used are no further from it than 7."""
    here = Int8Linear.ONEDNN_7_BITS  # from the CPU's flags
    int8_chooser(monkeypatch, forced="onednn")
    torch.manual_seed(0)
    linear, x = nn.Linear(48, 200), torch.randn(40, 48)
    want = nn.functional.linear(x, linear.weight, linear.bias).detach()
    errors = {}
    for seven in (True, False):
        monkeypatch.setattr(Int8Linear, "ONEDNN_7_BITS", seven)
        layer = Int8Linear.from_float(linear.weight, linear.bias)
        with torch.inference_mode():
            got = layer(x)
        assert layer.engine == "onednn" and layer.seven_bits is seven
        errors[seven] = float((got - want).abs().mean())
    assert errors[here] < 0.03 * float(want.abs().mean())
    if not here:
        assert errors[False] <= errors[True]


def test_a_forced_int8_engine_must_exist(monkeypatch):
    monkeypatch.setattr(kernels, "_choosers", {})
    monkeypatch.setenv("TRANSLATE_INT8_KERNEL", "mkl")
    with pytest.raises(UsageError, match="TRANSLATE_INT8_KERNEL=mkl"):
        kernels.chooser("int8")


@pytest.mark.parametrize("kernel", sorted(kernels.KERNELS))
@pytest.mark.parametrize("shape", [(1, 48), (4, 48), (2, 7, 48), (0, 48)])
@pytest.mark.parametrize("out", [200, 203, 5])  # split: blocks that divide it, overlap, or none
def test_every_kernel_computes_the_layer(kernel, shape, out, monkeypatch):
    monkeypatch.setitem(kernels._choosers, "float32", kernels.Chooser(None, forced=kernel))
    torch.manual_seed(0)
    linear = nn.Linear(48, out)
    x = torch.randn(shape)
    tuned = TunedLinear(linear.weight, linear.bias)
    assert tuned.weight.t().is_contiguous()  # column-major
    with torch.inference_mode():
        torch.testing.assert_close(tuned(x), linear(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kernels.KERNELS[kernel](x, linear.weight, None),
                                   nn.functional.linear(x, linear.weight), rtol=1e-5, atol=1e-5)


def slow_kernel(seconds: float):
    """F.linear that takes at least `seconds`: a kernel on trial that must lose."""
    def kernel(x, weight, bias):
        time.sleep(seconds)
        return nn.functional.linear(x, weight, bias)
    return kernel


@pytest.fixture
def two_kernels(monkeypatch):
    """A fast and a slow kernel as the only float32 choices, trials of a few calls."""
    monkeypatch.setattr(kernels, "KERNELS", {"fast": nn.functional.linear,
                                             "slow": slow_kernel(0.002)})
    monkeypatch.setattr(kernels, "TRIAL_SECONDS", 0.0)
    monkeypatch.setattr(kernels, "busy", lambda threads: False)
    return ("fast", "slow")


def test_kernels_are_tried_on_real_calls_and_the_fastest_kept(tmp_path, two_kernels):
    """Until a shape and row bucket has a kernel, its calls try each kernel in turn (timed,
    the first call of each untimed), computing the right result all along; then the fastest
    is kept, for this process and in the file."""
    path = tmp_path / "kernels.json"
    chooser = kernels.Chooser(path, names=two_kernels)
    torch.manual_seed(0)
    weight, bias = torch.randn(300, 64).t().contiguous().t(), torch.randn(300)
    calls = 2 * (kernels.TIMED_CALLS + 1)  # the trial
    for rows in [1] * calls + [3] * calls + [4, 40]:
        x = torch.randn(rows, 64)
        torch.testing.assert_close(chooser.linear(x, weight, bias),
                                   nn.functional.linear(x, weight, bias))
    assert chooser.table == {"300x64@1": "fast", "300x64@4": "fast"}  # 3 rows share 4's bucket
    assert set(chooser.trials) == {"300x64@64"}  # one call so far
    assert kernels.Chooser(path, names=two_kernels).table == chooser.table


needs_packing = pytest.mark.skipif(not kernels.PACKABLE, reason="torch has no oneDNN here")


def rigged(monkeypatch, chooser, method, ratio: float) -> list:
    """`chooser`'s pairwise trial `method` sees every pair's first call take `ratio` times the
    second's time; returns the list of the shapes it is called for."""
    compared, real = [], getattr(kernels.Chooser, method)
    monkeypatch.setattr(chooser, method, lambda shape, first_s, second_s: compared.append(
        shape) or real(chooser, shape, ratio * second_s, second_s))
    return compared


def layers_after_a_trial(linear, x, decision, holds_both, first: int = 1) -> list[TunedLinear]:
    """Six TunedLinear copies of `linear`, each called on x (and checked against `linear`) until
    `decision()` is made; meanwhile, from their `first` call, the first LAYOUT_LAYERS take
    part, holding both forms."""
    layers = [TunedLinear(linear.weight, linear.bias) for _ in range(6)]
    # a pair per two calls, after an untimed one
    for call in range(1, 2 * kernels.LAYOUT_PAIRS + 1 + first):
        if decision() is not None:
            return layers
        for layer in layers:
            torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
        if decision() is None:
            taking_part = kernels.LAYOUT_LAYERS if call >= first else 0
            assert sum(map(holds_both, layers)) == taking_part
    assert decision() is not None
    return layers


@needs_packing
def test_a_layer_tries_both_layouts_and_moves_to_the_one_kept(tmp_path, monkeypatch):
    """Once its kernel is chosen, a layer called again with as many rows alternates between
    its plain weight and a packed copy, computing the layer all along; its pairs of calls
    decide the shape's layout, and every layer of the shape follows: packed (the plain weight
    freed) or plain (the copy freed)."""
    for ratio, layout in ((0.5, "packed"), (1.05, "packed"), (1.5, "plain")):
        chooser = kernels.Chooser(tmp_path / f"{layout}{ratio}.json")
        chooser.table["200x48@4"] = "mkl"  # the kernel chosen: the layout trial may start
        monkeypatch.setitem(kernels._choosers, "float32", chooser)
        monkeypatch.setattr(kernels, "busy", lambda threads: False)
        compared = rigged(monkeypatch, chooser, "compare_layouts", ratio)
        torch.manual_seed(0)
        linear, x = nn.Linear(48, 200), torch.randn(4, 48)
        with torch.inference_mode():
            layers = layers_after_a_trial(linear, x, lambda: chooser.layout((200, 48)),
                                          lambda layer: layer.packed is not None, first=2)
            for layer in layers:
                torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
                assert (layer.weight is None) == (layout == "packed")
                assert (layer.packed is None) == (layout == "plain")
        assert len(compared) == kernels.LAYOUT_PAIRS and chooser.layout((200, 48)) == layout
        assert kernels.Chooser(chooser.path).layout((200, 48)) == layout  # kept


@needs_packing
def test_one_row_calls_and_single_calls_leave_the_layout_undecided(tmp_path, monkeypatch):
    """The layout is tried on calls of more rows only: one-row calls, however many, take no
    part (they try the row-major copy against the plain weight, whose layout is still open),
    nor do layers called once with a row count (an encoder's, for one sentence), which hold
    no packed copy."""
    chooser = kernels.Chooser(tmp_path / "kernels.json")
    chooser.table.update({"200x48@1": "mkl", "200x48@4": "mkl"})
    monkeypatch.setitem(kernels._choosers, "float32", chooser)
    monkeypatch.setattr(kernels, "busy", lambda threads: False)
    compared = rigged(monkeypatch, chooser, "compare_layouts", 0.5)
    torch.manual_seed(0)
    linear, x = nn.Linear(48, 200), torch.randn(1, 48)
    with torch.inference_mode():
        layers = layers_after_a_trial(linear, x, lambda: chooser.one_row((200, 48)),
                                      lambda layer: layer.row_major is not None)
        x4 = torch.randn(4, 48)
        for layer in layers:  # once each
            torch.testing.assert_close(layer(x4), linear(x4), rtol=1e-5, atol=1e-5)
    assert chooser.one_row((200, 48)) is not None and chooser.layout((200, 48)) is None
    assert not compared and all(layer.packed is None for layer in layers)


@pytest.mark.parametrize("shape", [(1, 48), (1, 1, 48), (3, 48), (2, 3, 48), (0, 48)])
@pytest.mark.parametrize("out", [200, 203, 3])  # blocks that divide it, overlap, or too few rows
def test_row_blocks_computes_the_layer_from_the_row_major_matrix(shape, out):
    torch.manual_seed(0)
    linear, x = nn.Linear(48, out), torch.randn(shape)
    with torch.inference_mode():
        for bias in (linear.bias, None):
            torch.testing.assert_close(kernels.RowBlocks(linear.weight, bias)(x),
                                       nn.functional.linear(x, linear.weight, bias),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(300, 48), (0, 48)])
def test_the_row_major_copy_is_a_copy_of_its_own(shape):
    """The copy one-row calls read (in a mapping of its own, for 2 MB pages): the matrix,
    row-major, unchanged by later writes to the original, whose memory it does not share."""
    matrix = torch.randn(shape).t().contiguous().t()  # column-major, as a layer holds it
    copy = precision.row_major_in_huge_pages(matrix)
    assert copy.is_contiguous() and torch.equal(copy, matrix)
    matrix.add_(1)
    assert not copy.numel() or not torch.equal(copy, matrix)


@pytest.mark.parametrize("layout", ["plain", pytest.param("packed", marks=needs_packing)])
def test_one_row_calls_try_a_row_major_copy_and_every_layer_follows_the_choice(
        layout, tmp_path, monkeypatch):
    """Once a shape's own way is settled, its layers' one-row calls alternate between it and a
    row-major copy, computing the layer all along; their pairs decide the shape's one-row way,
    and every layer follows it: a copy of its own, or none (the trial's freed). Calls of more
    rows never read the copy."""
    one_row_calls = []

    def row_blocks(self, x):
        one_row_calls.append(kernels.rows(x))
        return kernels.F.linear(x, self.weight, self.bias)

    monkeypatch.setattr(kernels.RowBlocks, "__call__", row_blocks)
    monkeypatch.setattr(kernels, "busy", lambda threads: False)
    for ratio, way in ((1.05, "own"), (1.5, "row-major")):
        chooser = kernels.Chooser(tmp_path / f"{layout}-{way}.json")
        chooser.table.update({"200x48@layout": layout, "200x48@1": "mkl"})
        monkeypatch.setitem(kernels._choosers, "float32", chooser)
        compared = rigged(monkeypatch, chooser, "compare_one_row", ratio)
        torch.manual_seed(0)
        linear, x, x4 = nn.Linear(48, 200), torch.randn(1, 1, 48), torch.randn(4, 48)
        with torch.inference_mode():
            layers = layers_after_a_trial(linear, x, lambda: chooser.one_row((200, 48)),
                                          lambda layer: layer.row_major is not None)
            for layer in layers:
                torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(layer(x4), linear(x4), rtol=1e-5, atol=1e-5)
                assert (layer.row_major is not None) == (way == "row-major")
                if layer.row_major is not None:
                    assert torch.equal(layer.row_major.weight, linear.weight)
        assert len(compared) == kernels.LAYOUT_PAIRS
        assert kernels.Chooser(chooser.path).one_row((200, 48)) == way  # kept
    assert set(one_row_calls) == {1}


@needs_packing
def test_a_layer_of_a_shape_kept_packed_packs_at_load_and_saves_the_same_matrix(
        model_dir, model, tokenizer, tmp_path, monkeypatch):
    """Packed at load (so forked workers share it), the model computes the same logits, and
    saved again it is the same file."""
    chooser = kernels.Chooser(None)
    d = model.cfg.d_model
    for name, module in [*model.named_modules(), ("qkv", nn.Linear(d, 3 * d))]:
        if isinstance(module, nn.Linear):
            chooser.table[kernels.Chooser.layout_key(tuple(module.weight.shape))] = "packed"
    monkeypatch.setitem(kernels._choosers, "float32", chooser)
    loaded = checkpoint.load(str(model_dir), "cpu").model
    tuned = [m for m in loaded.modules() if isinstance(m, TunedLinear)]
    assert tuned and all(m.weight is None and m.packed is not None for m in tuned)
    src = torch.randint(4, model.cfg.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(src, dtype=torch.bool)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(src, mask, src), model(src, mask, src),
                                   rtol=1e-4, atol=1e-4)
    checkpoint.save(loaded, tokenizer, tmp_path)
    weights = checkpoint.WEIGHTS
    assert (tmp_path / weights).read_bytes() == (model_dir / weights).read_bytes()


def tied_output(model, monkeypatch, chooser):
    """`model` loaded for float32 on the CPU with `chooser` for its tied output layer, which
    packs its matrix in blocks of 7 rows (the last one short)."""
    monkeypatch.setitem(kernels._choosers, "output", chooser)
    monkeypatch.setattr(precision.TiedOutput, "BLOCK", 7)
    loaded = precision.apply(copy.deepcopy(model), "float32", torch.device("cpu"))
    assert isinstance(loaded.tied_linear, precision.TiedOutput)
    return loaded, loaded.tied_linear


@needs_packing
def test_the_tied_output_layer_packs_its_matrix_only_for_row_counts_that_choose_it(
        model, monkeypatch):
    """The packed copy comes at the first call whose row count chose it and stays; until
    then only the embedding matrix is held; the logits are the same either way."""
    shape = tuple(model.embed.weight.shape)
    chooser = kernels.Chooser(None, names=kernels.FAMILIES["output"][0])
    chooser.table.update({kernels.Chooser.key(shape, 1): "onednn",
                          kernels.Chooser.key(shape, 4): "packed"})
    loaded, tied = tied_output(model, monkeypatch, chooser)
    assert model.cfg.vocab_size % 7 and model.embed.weight.dtype == torch.float32
    with torch.inference_mode():
        for rows, packed in ((1, False), (4, True), (1, True)):
            x = torch.randn(rows, model.cfg.d_model)
            torch.testing.assert_close(loaded.project(x), model.project(x), rtol=1e-5, atol=1e-5)
            assert (tied.blocks is not None) == packed
    assert len(tied.blocks) == -(-model.cfg.vocab_size // 7)


@needs_packing
def test_a_trial_that_rejects_the_packed_copy_frees_it(model, monkeypatch):
    """On trial, the packed copy is made and timed beside the plain matrix's kernel; when the
    plain one wins, the copy goes."""
    monkeypatch.setattr(kernels, "TRIAL_SECONDS", 0.0)
    monkeypatch.setattr(kernels, "busy", lambda threads: False)
    chooser = kernels.Chooser(None, names=("mkl", "packed"))
    loaded, tied = tied_output(model, monkeypatch, chooser)
    packed = tied.kernels["packed"]
    monkeypatch.setitem(tied.kernels, "packed", lambda *args: time.sleep(0.002) or packed(*args))
    held = []
    with torch.inference_mode():
        while not chooser.table:
            x = torch.randn(3, model.cfg.d_model)
            torch.testing.assert_close(loaded.project(x), model.project(x), rtol=1e-5, atol=1e-5)
            held.append(tied.blocks is not None)
    assert any(held) and tied.blocks is None
    assert chooser.table == {kernels.Chooser.key(tuple(model.embed.weight.shape), 3): "mkl"}


@needs_packing
def test_the_packed_copy_one_thread_workers_chose_is_made_before_they_fork(model, monkeypatch):
    """Made in the parent, the copy is shared by the forked workers instead of each making
    its own; where one-thread processes did not choose it, nothing is made."""
    shape = tuple(model.embed.weight.shape)
    for choice, made in (("onednn", False), ("packed", True)):
        chooser = kernels.Chooser(None, names=kernels.FAMILIES["output"][0])
        chooser.threads = 1  # what processes of one thread chose
        chooser.table[kernels.Chooser.key(shape, 32)] = choice
        loaded, tied = tied_output(model, monkeypatch, chooser)
        threads = torch.get_num_threads()
        precision.before_fork(loaded, threads=1)
        assert (tied.blocks is not None) == made
        assert torch.get_num_threads() == threads


@needs_onednn
def test_int8_layers_one_thread_workers_moved_to_onednn_move_before_they_fork(model_dir,
                                                                           monkeypatch):
    """Moved in the parent, a layer's oneDNN packing is shared by the forked workers instead
    of each making its own; layers of the shapes they keep on fbgemm stay."""
    loaded = checkpoint.load(str(model_dir), "cpu", dtype="int8").model
    layers = [m for m in loaded.modules() if isinstance(m, Int8Linear)]
    shape = (layers[0].out_features, layers[0].in_features)
    chooser = kernels.Chooser(None, names=kernels.INT8_ENGINES, threads=1)
    chooser.table[kernels.Chooser.key(shape, 64)] = "onednn"
    monkeypatch.setattr(kernels, "chooser", lambda family, threads=None: chooser)
    precision.before_fork(loaded, threads=1)
    moved = [(m.out_features, m.in_features) == shape for m in layers]
    assert [m.engine for m in layers] == ["onednn" if m else "fbgemm" for m in moved]
    assert not all(moved)


def test_another_thread_counts_choices_leave_this_process_chooser_alone(monkeypatch):
    """Reading what workers of another thread count chose (before forking them) does not
    replace this process's chooser, with its trials and unsaved choices."""
    own = kernels.Chooser(None, names=kernels.FAMILIES["output"][0])
    own.table["9x9@1"] = "mkl"
    monkeypatch.setitem(kernels._choosers, "output", own)
    other = kernels.chooser("output", own.threads + 1)
    assert other.threads == own.threads + 1 and "9x9@1" not in other.table
    assert kernels.chooser("output") is own


def test_a_handicapped_kernel_must_win_by_its_handicap():
    """The tied output layer's packed copy costs memory: it is chosen only when faster by
    more than its handicap."""
    n = kernels.TIMED_CALLS
    trial = kernels.Trial(("plain", "packed"), {"plain": [0.010] * n, "packed": [0.009] * n})
    assert trial.winner() == "packed"
    assert trial.winner({"packed": 1.15}) == "plain"
    trial.seconds["packed"] = [0.008] * n
    assert trial.winner({"packed": 1.15}) == "packed"


def test_an_unfinished_trial_goes_on_in_the_next_process(tmp_path, two_kernels):
    """A one-sentence run is too short to finish a trial: what it timed is kept for the
    next, whose own first call of each kernel is again untimed (set-up)."""
    path = tmp_path / "kernels.json"
    weight, x = torch.randn(300, 64), torch.randn(1, 64)
    first = kernels.Chooser(path, names=two_kernels)
    for _ in range(4):  # each kernel: one untimed call, one timed
        first.linear(x, weight, None)
    first.save_trials()
    second = kernels.Chooser(path, names=two_kernels)
    assert {n: len(s) for n, s in second.trials["300x64@1"].seconds.items()} == {"fast": 1,
                                                                                "slow": 1}
    for _ in range(2 * kernels.TIMED_CALLS):  # 2 untimed here, then the 2 x 2 still missing
        second.linear(x, weight, None)
    assert second.table == {"300x64@1": "fast"} and not second.trials
    assert kernels.Chooser(path, names=two_kernels).trials == {}


def test_a_kept_choice_is_used_without_a_trial(tmp_path, two_kernels, monkeypatch):
    path = tmp_path / "kernels.json"
    kernels.Chooser(path, names=two_kernels).keep("300x64@1", "slow")
    chooser = kernels.Chooser(path, names=two_kernels)
    used = []
    monkeypatch.setitem(kernels.KERNELS, "slow", lambda *args: used.append(1) or
                        nn.functional.linear(*args))
    chooser.linear(torch.randn(1, 64), torch.randn(300, 64), None)
    assert used == [1] and not chooser.trials


def test_choices_kept_among_other_kernels_are_measured_again(tmp_path, two_kernels):
    """A file written when the kernels were others (an earlier version) is not trusted: a
    newer kernel was never tried against the kept one."""
    path = tmp_path / "kernels.json"
    kernels.Chooser(path, names=("fast",)).keep("300x64@1", "fast")
    assert kernels.Chooser(path, names=("fast",)).table == {"300x64@1": "fast"}
    assert kernels.Chooser(path, names=two_kernels).table == {}


def test_a_choice_measured_on_a_busy_machine_is_not_kept(tmp_path, monkeypatch):
    path = tmp_path / "kernels.json"
    chooser = kernels.Chooser(path)
    monkeypatch.setattr(machine, "others_running", lambda: 2)  # two others at work
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    chooser.keep("300x64@1", "mkl")
    monkeypatch.setattr(machine, "others_running", lambda: 0)  # this process alone
    chooser.keep("300x64@4", "mkl")
    assert chooser.table == {"300x64@1": "mkl", "300x64@4": "mkl"}  # both serve this process
    assert set(kernels.Chooser(path).table) == {"300x64@4"}  # the busy one measured again


@contextmanager
def another_process_at_work():
    """A child process spinning on a core, for as long as the block runs."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def test_another_process_at_work_counts_as_busy_and_this_one_does_not():
    """What decides whether a choice is kept: another process computing now is seen at once,
    not a minute later, and this process's own threads are never counted."""
    before = machine.others_running()
    with another_process_at_work():
        assert machine.others_running() >= 1
    torch.randn(512, 512) @ torch.randn(512, 512)  # our own threads, just at work
    assert machine.others_running() <= max(before, 0) + 1


def test_threads_sleep_between_regions_only_when_others_are_at_work(monkeypatch):
    """OMP_WAIT_POLICY=PASSIVE where another process computes as we start; nothing on an idle
    machine; never over the user's own choice."""
    busy, chosen = {}, {"OMP_WAIT_POLICY": "ACTIVE"}
    with another_process_at_work():
        machine.calm_threads_when_busy(busy)
        machine.calm_threads_when_busy(chosen)
    assert busy == {"OMP_WAIT_POLICY": "PASSIVE"} and chosen == {"OMP_WAIT_POLICY": "ACTIVE"}
    monkeypatch.setattr(machine, "others_running", lambda: 0)
    idle = {}
    machine.calm_threads_when_busy(idle)
    assert idle == {}


def test_freed_blocks_are_kept_for_reuse_unless_the_user_set_glibc_up(monkeypatch):
    """The command line keeps blocks of up to 32 MB in the heap and its top up to 64 MB, so a
    step's large tensors reuse the last step's pages; a user's MALLOC_* settings win."""
    calls = []

    class Glibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(machine, "glibc", Glibc)
    machine.reuse_freed_memory({})
    assert calls == [(machine.M_MMAP_THRESHOLD, 32 << 20), (machine.M_TRIM_THRESHOLD, 64 << 20)]
    calls.clear()
    for chosen in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        machine.reuse_freed_memory({chosen: "131072"})
    assert calls == []


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux's accounting")
def test_the_cache_buffers_are_private_memory_not_shared():
    """Shared anonymous memory is shmem, which Linux gives no 2 MB pages by default and whose
    faults cost more: the KV cache's buffers are private to the process."""
    from core.cache import outside_heap

    def shmem_kib():
        status = Path("/proc/self/status").read_text().splitlines()
        return sum(int(line.split()[1]) for line in status if line.startswith("RssShmem:"))

    before = shmem_kib()
    buffer = outside_heap((4 << 20,), torch.empty(0)).fill_(1.0)  # 16 MB, every page touched
    assert shmem_kib() - before < 1024
    assert buffer.sum().item() == 4 << 20


def test_a_forced_kernel_must_exist(monkeypatch):
    monkeypatch.setattr(kernels, "_choosers", {})
    monkeypatch.setenv("TRANSLATE_KERNEL", "blas9")
    with pytest.raises(UsageError, match="TRANSLATE_KERNEL=blas9"):
        kernels.chooser()
