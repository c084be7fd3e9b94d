"""Inference precisions: float32, bfloat16, and int8 linear layers for CPU.

float32 on the CPU keeps every weight matrix column-major, i.e. W^T row-major (see
`column_major`). int8 keeps each weight matrix (and the embedding table) as int8 with one scale
per row and quantizes the activations on the fly (dynamic quantization): a quarter of the weight
bytes to read every decoding step, and int8 dot products where the CPU has them."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from core.errors import UsageError

DTYPES = ("float32", "bfloat16", "int8")


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A matrix as int8 with one scale per row: (rows, cols) int8 and (rows,) float32."""
    weight = weight.detach()
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.size(0))  # (rows,)
    for start in range(0, weight.size(0), 4096):  # in slices: float temporaries stay small
        rows = slice(start, start + 4096)
        w = weight[rows].float()
        scale[rows] = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        q[rows] = torch.round(w / scale[rows, None]).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 (one scale per output row) and x quantized per call, with
    one scale for the whole input: fbgemm's dynamic quantization, the fastest int8 kernels
    PyTorch has on x86. That shared scale makes a sentence's result depend slightly on the
    other sentences of its batch."""

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None = None):
        super().__init__()
        zero = torch.zeros(q.size(0), dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated; these kernels are not
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        self.packed = torch.ops.quantized.linear_prepack(
            qweight, None if bias is None else bias.detach().float())

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None) -> Int8Linear:
        return cls(*quantize_rows(weight), bias)

    def forward(self, x: Tensor) -> Tensor:
        # activations get 7 bits so that CPUs without VNNI never saturate their 16-bit sums
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True)  # (..., out)


class Int8Embeddings(nn.Module):
    """Token embeddings looked up in an int8 table with one scale per row: a quarter of the
    float32 table's memory (119 MB -> 30 MB for a 58k x 512 vocabulary)."""

    def __init__(self, q: Tensor, row_scale: Tensor, scale: float):
        super().__init__()
        self.table, self.row_scale, self.scale = q, row_scale, scale  # (V, D), (V,), sqrt(D) or 1

    def forward(self, tokens: Tensor) -> Tensor:
        scale = self.row_scale[tokens] * self.scale  # (B, T)
        return self.table[tokens].float() * scale[..., None]  # (B, T, D)


def quantize_int8(module: nn.Module) -> None:
    """Replace every nn.Linear below `module` with an Int8Linear, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_float(child.weight, child.bias))
        else:
            quantize_int8(child)


def check(dtype: str, device: torch.device) -> None:
    """Refuse a precision that does not exist or cannot run on `device`."""
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}'; choose from {', '.join(DTYPES)}")
    if dtype == "int8" and device.type != "cpu":
        raise UsageError("--dtype int8 runs on the CPU; use --dtype bfloat16 on a GPU")


def column_major(model: nn.Module, dtype: str, device: torch.device) -> set[str]:
    """The weights to store column-major (W^T row-major) when reading a model: every linear
    layer's matrix and the embedding table, for float32 on the CPU. F.linear then hands MKL's
    GEMM an untransposed right-hand matrix, which it multiplies faster at the few rows of a
    decoding step (32 rows through a 2048 x 512 layer: 0.32 against 0.48 ms on 2 threads), so
    the benchmark's W1-W3 decode 5-34% faster and W4 as fast (benchmarks/README.md). Token
    lookups read strided rows, a negligible cost. The stored file is unchanged."""
    if dtype != "float32" or device.type != "cpu":
        return set()
    linear = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return linear | {"embed.weight"}


def apply(model: nn.Module, dtype: str, device: torch.device) -> nn.Module:
    """Convert a loaded float32 model for inference in `dtype` (already `check`ed)."""
    if dtype == "bfloat16":
        return model.to(torch.bfloat16)
    if dtype == "int8":
        q, scale = quantize_rows(model.embed.weight)
        model.embed = Int8Embeddings(q, scale, model.embed.scale)  # the float32 table is freed
        if model.lm_head is None:  # tied: the output layer is the same int8 matrix, and adds
            # the logits bias inside its kernel (a pass over (N, V) saved per step)
            model.lm_head = Int8Linear(q, scale, model.logits_bias)
            model.logits_bias = None
        quantize_int8(model)
    return model
