"""Inference precisions: float32, bfloat16, and float16 and int8 linear layers for CPU, and
the loading that puts each layer into its precision as soon as it is read.

float32 on the CPU keeps every weight matrix column-major, i.e. W^T row-major, and multiplies
with the kernel measured fastest for the layer's shape and rows (core.kernels), or, for the
shapes measured faster so, in oneDNN's own packed layout (the tied output layer: a packed copy
beside its matrix, for the row counts measured faster so). float16 keeps the weight matrices
(and the embedding table) in half precision and computes in float32 (fbgemm's fp16 kernels):
half the weight bytes to read every decoding step. int8 keeps them as int8 with one scale per
row and quantizes the activations on the fly (dynamic quantization): a quarter of the bytes,
and int8 dot products where the CPU has them."""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from core import cache, kernels, machine

from core.errors import UsageError

DTYPES = ("float32", "bfloat16", "float16", "int8")


def quantize_rows(weight) -> tuple[Tensor, Tensor]:
    """A matrix (a tensor, or anything with a shape whose row slices are tensors) as int8 with
    one scale per row: (rows, cols) int8 and (rows,) float32."""
    q = torch.empty(tuple(weight.shape), dtype=torch.int8)
    scale = torch.empty(weight.shape[0])  # (rows,)
    for start in range(0, weight.shape[0], 4096):  # in slices: float temporaries stay small
        rows = slice(start, start + 4096)
        w = weight[rows].detach().float()
        scale[rows] = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        q[rows] = torch.round(w / scale[rows, None]).to(torch.int8)
    return q, scale


def per_channel(q: Tensor, scale: Tensor) -> Tensor:
    """An int8 matrix with one scale per row as a quantized tensor over q's own memory, for
    prepacking (torch's maker copies it: for a tied 58k x 512 output layer, a third 30 MB copy
    beside the embedding table and the packing while it is made)."""
    zero = torch.zeros(q.size(0), dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated; these kernels are not
        warnings.simplefilter("ignore")
        qt = torch._empty_per_channel_affine_quantized(
            (0, q.size(1)), scales=scale.double(), zero_points=zero, axis=0, dtype=torch.qint8)
    return qt.set_(q.untyped_storage(), q.storage_offset(), q.shape, q.stride())


def on_packed(op, *args):
    """torch.ops `op` called on a packed weight (fbgemm's, a TorchScript object), with
    __torch_function__ dispatch off. On, torch asks each argument for __torch_function__ first,
    and the packed object answers by throwing a C++ exception, caught as an AttributeError:
    15 us a call (Zen 3 EPYC, one thread: a 16 x 16 int8 product 21-23 us so, 6.3 without),
    45 calls a step for one sentence of the benchmark model (int8 W1 of benchmarks/ 1.21x as
    fast, W2 1.16x). Inference has no tensor subclass whose override this would skip.

    The op's C++ function is called directly: the torch.ops packet's own call first walks every
    argument in Python looking for the placeholder objects that only tracing makes, 2 us a call
    (Zen 3 EPYC: a 16 x 16 int8 product 5.9 us so, 3.9 without)."""
    with torch._C.DisableTorchFunctionSubclass():
        return getattr(op, "_op", op)(*args)


@contextmanager
def quantized_engine(name: str | None):
    """Prepacking packs for the engine set at the time (calls then follow the packing)."""
    before = torch.backends.quantized.engine
    if name is not None:
        torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 (one scale per output row) and x quantized per call, with
    one scale for the whole input: dynamic quantization, in fbgemm's kernels (the fastest
    PyTorch has on x86 at few rows) or oneDNN's. That shared scale makes a sentence's result
    depend slightly on the other sentences of its batch.

    Called with ONEDNN_ROWS rows or more (a batch), a layer for whose shape core.kernels
    measures oneDNN at least ONEDNN_WIN times faster at those rows moves to oneDNN's packing
    for good and frees fbgemm's. Where the CPU multiplies int8 into 32-bit sums (VNNI, AMX),
    oneDNN's layers quantize activations to all 8 bits, not 7: on Multi30k test2016 the de-en
    model's int8 BLEU went from 42.05 to 42.42 that way (float32 42.36; fbgemm alone 42.23).

    fbgemm's packing is whole until the layer's first call with ONEDNN_ROWS rows or more.
    There a wide layer (the output layer) goes over to blocks of BLOCK output rows for good,
    each computed into its slice of the result: fbgemm gives every call an int32 buffer as large
    as its output, 30 MB for 128 beam rows of a 58k vocabulary beside the 30 MB of logits, and
    the heap keeps what that churns (one such call: 444 MB peak whole, 341 blocked). At a
    decoding step's few rows one call is faster than BLOCK's 8 calls and copies (Intel Xeon
    with AMX, 2 threads, a 58k x 512 layer: 0.90 ms against 1.32 at one row, 1.29 against 1.94
    at 4). oneDNN writes its sums scaled into the result: one block."""

    BLOCK = 8192
    # fbgemm to start with where torch has it, and oneDNN to move to
    FIRST = "fbgemm" if "fbgemm" in kernels.INT8_ENGINES else None
    MOVABLE = set(kernels.INT8_ENGINES) >= {"fbgemm", "onednn"}
    # 7-bit activations keep the 16-bit sums of CPUs without VNNI from saturating
    ONEDNN_7_BITS = not machine.cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}
    ONEDNN_ROWS = 32
    # a move is for good, at every row count after: oneDNN must win clearly where measured
    # (Zen 4 EPYC, one thread: 1.18x for the 58k-row output layer at 128 rows; 0.9-1.06x for
    # 512-wide layers, which a handicap of 1 moved on noise: int8-w2 W3 then read 0.86x
    # CTranslate2's best, against 0.90x before and 0.97x with this one)
    ONEDNN_WIN = 1.1

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None = None,
                 shared: bool = False):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.engine = self.FIRST
        self.packed = self.pack(q, scale, bias, self.out_features)
        # where the int8 matrix is held anyway (`shared`: the tied output layer's is the
        # embedding table), blocks and oneDNN's packing are made from it: unpacking the packing
        # took about as long as packing (Intel Xeon with AMX, a 58k x 512 layer: 0.34-0.38 s,
        # packing 0.38-0.50)
        self.shared = (q, scale, bias) if shared else None

    def pack(self, q: Tensor, scale: Tensor, bias: Tensor | None, block: int) -> list:
        """fbgemm's packing (or, without fbgemm, the default engine's), in blocks of `block`
        rows."""
        with quantized_engine(self.FIRST):
            return [torch.ops.quantized.linear_prepack(
                per_channel(q[i:i + block], scale[i:i + block]),
                None if bias is None else bias[i:i + block].detach().float())
                for i in range(0, q.size(0), block)]

    def in_blocks(self) -> None:
        """Go over from one packing to blocks of BLOCK rows, if the layer is wider."""
        if self.engine == self.FIRST and len(self.packed) == 1 and self.out_features > self.BLOCK:
            self.packed = self.pack(*self.matrix(self.packed), self.BLOCK)
            give_back_memory()

    def onednn_packing(self, packed: list) -> list:
        """oneDNN's packing of the weights in fbgemm's `packed` (see matrix())."""
        return [OneDNNInt8(*self.matrix(packed))]

    def matrix(self, packed: list) -> tuple[Tensor, Tensor, Tensor | None]:
        """The int8 matrix, its row scales and the bias: the shared ones, or out of `packed`.
        `packed` empties either way (where it is the layer's own, each block is freed once
        read: repacking never holds more than the int8 matrix beside where it ends)."""
        if self.shared is None:
            return self.unpacked(packed)
        packed.clear()
        return self.shared

    def unpacked(self, packed: list) -> tuple[Tensor, Tensor, Tensor | None]:
        """The int8 matrix, its row scales and the bias, out of `packed`, which empties."""
        q = torch.empty(self.out_features, self.in_features, dtype=torch.int8)
        scale, biases, row = torch.empty(self.out_features), [], 0
        while packed:
            weight, bias = torch.ops.quantized.linear_unpack(packed.pop(0))
            rows = slice(row, row + weight.size(0))
            q[rows], scale[rows] = weight.int_repr(), weight.q_per_channel_scales()
            biases.append(bias)
            row += weight.size(0)
        return q, scale, None if biases[0] is None else torch.cat(biases)

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None) -> Int8Linear:
        return cls(*quantize_rows(weight), bias)

    @classmethod
    def joined(cls, parts: list[Int8Linear]) -> Int8Linear:
        """One layer whose output is the parts' outputs side by side: their rows in turn, each
        with its own scale, so the same products (x quantizes alike for all of them)."""
        q, scale, bias = zip(*(part.unpacked(list(part.packed)) for part in parts))
        return cls(torch.cat(q), torch.cat(scale), None if bias[0] is None else torch.cat(bias))

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        if rows >= self.ONEDNN_ROWS and self.engine == self.FIRST:
            if self.MOVABLE:
                self.choose_engine(rows)
            self.in_blocks()  # where it stays with fbgemm
        return self.run(x.float(), self.packed, self.seven_bits)

    @property
    def seven_bits(self) -> bool:
        """Whether activations are quantized to 7 bits (fbgemm's always; oneDNN's on CPUs
        without VNNI or AMX)."""
        return self.engine != "onednn" or self.ONEDNN_7_BITS

    def run(self, x: Tensor, packed: list, seven_bits: bool = True) -> Tensor:
        if isinstance(packed[0], OneDNNInt8):
            return packed[0](x, seven_bits)
        # fbgemm's activations get 7 bits so that CPUs without VNNI never saturate their
        # 16-bit sums
        if len(packed) == 1:
            return on_packed(torch.ops.quantized.linear_dynamic, x, packed[0], seven_bits)
        out = x.new_empty(*x.shape[:-1], self.out_features)  # (..., out)
        for i, block in enumerate(packed):  # x quantizes alike in every block
            out[..., i * self.BLOCK:(i + 1) * self.BLOCK] = on_packed(
                torch.ops.quantized.linear_dynamic, x, block, seven_bits)
        return out

    def choose_engine(self, rows: int) -> None:
        """Move to oneDNN if it is the engine measured (or kept) fastest at `rows` here."""
        trial = []

        def measure() -> str:  # on this very layer, whose oneDNN packing is kept if it wins
            trial.append(self.onednn_packing(list(self.packed)))
            x = torch.randn(kernels.bucket(rows), self.in_features)
            return kernels.fastest({self.engine: lambda: self.run(x, self.packed),
                                    "onednn": lambda: self.run(x, trial[0], self.ONEDNN_7_BITS)},
                                   handicap={"onednn": self.ONEDNN_WIN})

        key = kernels.Chooser.key((self.out_features, self.in_features), rows)
        if kernels.chooser("int8").choose(key, measure) == "onednn":
            self.move_to_onednn(trial[0] if trial else None)
        elif trial:  # the trial's packing freed
            trial.clear()
            give_back_memory()

    def move_to_onednn(self, packing: list | None = None) -> None:
        """Give up fbgemm's packing for oneDNN's (`packing`, or made from it now)."""
        self.packed = packing if packing is not None else self.onednn_packing(self.packed)
        self.engine = "onednn"
        give_back_memory()

    def before_fork(self, threads: int) -> None:
        """Move now if processes of `threads` threads chose oneDNN for this shape at some row
        count, else go over to blocks, so that workers forked next (for batches) share one
        packing rather than each making their own."""
        shape = (self.out_features, self.in_features)
        if self.MOVABLE and self.engine != "onednn" and kernels.chooser(
                "int8", threads).chosen_anywhere(shape, "onednn"):
            self.move_to_onednn()
        self.in_blocks()  # where it stays with fbgemm


class OneDNNInt8:
    """An int8 matrix in oneDNN's layout alone (torch.ops.onednn, as torch's compiler uses it),
    with its row scales and bias; calls quantize x dynamically, one scale for all of it.
    torch.ops.quantized's oneDNN engine would also keep the matrix as it was: 65 MB for a 58k x
    512 output layer where this holds 30."""

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None):
        self.weight = torch.ops.onednn.qlinear_prepack(q, None)  # (in, out), oneDNN's layout
        self.scale, self.bias = scale, None if bias is None else bias.detach().float()
        self.zero = torch.zeros(q.size(0), dtype=torch.long)

    def __call__(self, x: Tensor, seven_bits: bool) -> Tensor:
        x2 = x.reshape(-1, x.size(-1))  # (R, in)
        if not x2.size(0):  # no rows: nothing to take a scale from
            return x.new_empty(*x.shape[:-1], self.scale.size(0))
        with warnings.catch_warnings():  # quantized tensors are deprecated; these kernels are not
            warnings.simplefilter("ignore")
            q = torch.quantize_per_tensor_dynamic(x2, torch.quint8, seven_bits)
        out = torch.ops.onednn.qlinear_pointwise(
            q.int_repr(), q.q_scale(), q.q_zero_point(), self.weight, self.scale, self.zero,
            self.bias, 1.0, 0, torch.float32, "none", [], "")  # (R, out)
        return out.view(*x.shape[:-1], out.size(-1))  # (..., out)


class Int8Embeddings(nn.Module):
    """Token embeddings looked up in an int8 table with one scale per row: a quarter of the
    float32 table's memory (119 MB -> 30 MB for a 58k x 512 vocabulary)."""

    def __init__(self, q: Tensor, row_scale: Tensor, scale: float):
        super().__init__()
        self.table, self.row_scale, self.scale = q, row_scale, scale  # (V, D), (V,), sqrt(D) or 1

    def forward(self, tokens: Tensor) -> Tensor:
        scale = self.row_scale[tokens] * self.scale  # (B, T)
        return self.table[tokens].float() * scale[..., None]  # (B, T, D)


class Float16Linear(nn.Module):
    """y = x W^T + b with W stored in float16 (fbgemm's packed layout) and float32 arithmetic."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.packed = torch.ops.quantized.linear_prepack_fp16(
            weight.detach().float(), None if bias is None else bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        return on_packed(torch.ops.quantized.linear_dynamic_fp16, x.float(), self.packed)


class Float16Embeddings(nn.Module):
    """Token embeddings looked up in a float16 table: half the float32 table's memory."""

    def __init__(self, weight: Tensor, scale: float):
        super().__init__()
        self.table, self.scale = weight.detach().half(), scale  # (V, D), sqrt(D) or 1

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table[tokens].float() * self.scale  # (B, T, D)


class TunedLinear(nn.Module):
    """nn.Linear for float32 on a CPU: the weight column-major, multiplied with the kernel
    measured fastest here for its shape and rows (core.kernels), or, where measured faster for
    its shape on this CPU, moved to oneDNN's own packed layout for good. Same state dict.

    The layout is tried on the model's own calls of more than one row once the shape's kernel
    is chosen: the first few layers of the shape called twice with a row count (LAYOUT_LAYERS)
    hold a packed copy beside their weight and alternate between the two, and each pair of
    calls at the same rows goes to the chooser, which keeps a layout
    (core.kernels.Chooser.compare_layouts); every layer of the shape follows it. A kept
    "packed" packs at load, so that forked workers share the packed weights. One-row calls take
    no part: they have a trial of their own (below), and at one row the two layouts are so
    close that a layout decided there came out packed or plain by chance (Zen 4 EPYC, four
    fresh trials on one sentence decoded greedily: 2048 x 512 plain in all four, 512 x 512 and
    1536 x 512 in two), while at a batch's rows packed is 1.2-1.7x as fast. Until the layout
    is decided, calls take the plain weight.

    Calls with one row try the layer's own way (the plain weight's kernel at one row, or the
    packed layout once kept) against kernels.RowBlocks over a row-major copy of its matrix the
    same way, and where the copy wins (kernels.ROW_MAJOR_WIN), every layer of the shape makes
    one on its first one-row call and keeps it: a second copy of the matrix, held only by the
    layers of a process that decodes one row at a time (the decoder, for one sentence greedily
    or sampled; Zen 4 EPYC, 2 threads: 72 MB for the benchmark model's decoder, whose peak RSS
    goes from 592 to 646 MB, and a greedy sentence 1.20-1.26x as fast)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        weight = weight.detach()
        self.shape = tuple(weight.shape)  # (out, in)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.packed: Tensor | None = None  # oneDNN's layout: a trial's copy, or the weight
        self.pending: tuple[str, int, float] | None = None  # the trial's last call: layout,
        # rows, seconds
        self.calls = 0  # calls in the layout trial
        self.trying: dict[int, bool | None] = {}  # row bucket: whether this layer takes part
        # in the layout trial (None: called once so far)
        self.one_row: str | None = None  # how one-row calls go, once the shape's trial is over
        self.one_row_trial: bool | None = None  # whether this layer takes part in it
        self.row_major: kernels.RowBlocks | None = None  # over the matrix row-major: one row
        self.one_row_calls, self.own_s = 0, 0.0  # the one-row trial's calls, and the last
        # call of the own way's seconds
        if kernels.PACKABLE and kernels.chooser().layout(self.shape) == "packed":
            self.packed = kernels.pack(weight)  # straight from the weight as read
            self.register_parameter("weight", None)
            return
        if weight.is_contiguous():  # row-major: lay it out column-major (one copy, once)
            weight = weight.t().contiguous().t()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (out, in), strides (1, out)

    def matrix(self) -> Tensor:
        """The weight (out, in), in whichever layout it is held."""
        return self.packed.to_dense() if self.weight is None else self.weight

    def pack_for_good(self) -> None:
        """Keep the packed layout only (the plain weight freed)."""
        if self.packed is None:
            self.packed = kernels.pack(self.weight)
        self.weight = None

    def forward(self, x: Tensor) -> Tensor:
        if self.one_row != "own" and kernels.rows(x) == 1:
            if self.one_row == "row-major":
                return self.row_major(x)  # (..., out)
            return self.at_one_row(x)
        return self.own(x)

    def own(self, x: Tensor) -> Tensor:
        """The product in the layer's layout, with the kernel chosen for it (or on trial)."""
        if self.weight is None:
            return kernels.onednn(x, self.packed, self.bias)  # (..., out)
        chooser = kernels.chooser()
        layout = chooser.layout(self.shape) if kernels.PACKABLE else "plain"
        if layout == "packed":
            self.pack_for_good()
            return kernels.onednn(x, self.packed, self.bias)
        rows = kernels.rows(x)
        if layout is None and rows > 1 and chooser.settled(self.shape, rows):
            bucket = kernels.bucket(rows)
            # a layer takes part from its second call at these rows: one called once (an
            # encoder layer, for one sentence) would hold a packed copy and time no pair
            if bucket not in self.trying:
                self.trying[bucket] = None
            elif self.trying[bucket] is None:
                self.trying[bucket] = chooser.enlist(chooser.key(self.shape, rows))
            if self.trying[bucket]:
                return self.try_layouts(x)
        if layout == "plain":
            self.packed = None  # the trial's copy
        return kernels.linear(x, self.weight, self.bias)  # (..., out)

    def try_layouts(self, x: Tensor) -> Tensor:
        """A call of the layout trial: packed and plain in turn, timed; a pair of calls at the
        same rows gives the chooser one comparison (not this layer's first pair: set-up)."""
        if self.packed is None:
            self.packed = kernels.pack(self.weight)
        layout = kernels.LAYOUTS[self.calls % 2]  # packed first
        self.calls += 1
        start = time.perf_counter()
        out = (kernels.onednn(x, self.packed, self.bias) if layout == "packed"
               else kernels.linear(x, self.weight, self.bias))  # (..., out)
        seconds, rows = time.perf_counter() - start, kernels.rows(x)
        if self.pending is not None and self.pending[:2] == ("packed", rows) and self.calls > 2:
            kernels.chooser().compare_layouts(self.shape, self.pending[2], seconds)
        self.pending = (layout, rows, seconds)
        return out

    def at_one_row(self, x: Tensor) -> Tensor:
        """A one-row call before this layer knows its one-row way: the shape's, where the
        chooser has one (the row-major copy made or freed to follow it); else, once the own way
        at one row is settled (the packed layout, or the plain weight's kernel at one row,
        whether or not the layout is decided), a call of the trial where this layer takes part
        (the first LAYOUT_LAYERS of the shape), or the own way."""
        chooser = kernels.chooser()
        self.one_row = chooser.one_row(self.shape)
        if self.one_row is not None:
            self.row_major = self.row_major_copy() if self.one_row == "row-major" else None
            return self(x)
        layout = chooser.layout(self.shape) if kernels.PACKABLE else "plain"
        if layout == "packed" or chooser.settled(self.shape, 1):
            if self.one_row_trial is None:
                self.one_row_trial = chooser.enlist(chooser.one_row_key(self.shape))
            if self.one_row_trial:
                return self.try_one_row(x)
        return self.own(x)

    def row_major_copy(self) -> kernels.RowBlocks:
        if self.row_major is not None:
            return self.row_major
        return kernels.RowBlocks(row_major_in_huge_pages(self.matrix()), self.bias)

    def try_one_row(self, x: Tensor) -> Tensor:
        """A call of the one-row trial: the own way and the row-major copy in turn, timed; each
        pair gives the chooser one comparison (not this layer's first: set-up)."""
        self.row_major = self.row_major_copy()
        self.one_row_calls += 1
        start = time.perf_counter()
        if self.one_row_calls % 2:
            out = self.own(x)
            self.own_s = time.perf_counter() - start
        else:
            out = self.row_major(x)
            if self.one_row_calls > 2:
                kernels.chooser().compare_one_row(self.shape, self.own_s,
                                                  time.perf_counter() - start)
        return out  # (..., out)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight is None:  # packed for good: the matrix back from oneDNN's layout
            destination[prefix + "weight"] = self.matrix()


class FusedProjection(TunedLinear):
    """A self-attention's q_proj, k_proj and v_proj as one TunedLinear (3D, D): one product
    where there were three, over the same input. At a decoding step's one row, each product
    pays a fixed cost beside reading its weights (Zen 4 EPYC, 2 threads, cold: a 512 x 512
    layer 64 us, 1536 x 512 150-174 us). Saved as the three it replaced, so that a checkpoint
    saved from the model is the one it was read from."""

    PARTS = ("q_proj", "k_proj", "v_proj")

    def __init__(self, q: TunedLinear, k: TunedLinear, v: TunedLinear):
        parts = (q, k, v)
        bias = None if q.bias is None else torch.cat([p.bias for p in parts])  # (3D,)
        super().__init__(torch.cat([p.matrix() for p in parts]), bias)  # (3D, D)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        whole = {}
        super()._save_to_state_dict(whole, "", keep_vars)
        owner = prefix.removesuffix("qkv.")  # it is its attention module's `qkv`
        for kind, tensor in whole.items():  # weight, bias
            for name, part in zip(self.PARTS, tensor.chunk(3)):
                destination[f"{owner}{name}.{kind}"] = part


def fuse(model: nn.Module) -> None:
    """Give each self-attention whose projections are TunedLinear or (unmoved) Int8Linear
    layers its q, k and v in one product (MultiHeadAttention.qkv). int8 too pays a fixed cost
    per product beside its arithmetic, quantizing x among it (Zen 4 EPYC, one process switching
    passes: int8 W1 1.07-1.11x, W2 1.06x, W3 on one thread 1.015x, W4 0.985x)."""
    for layer in [*model.encoder, *model.decoder]:
        attn = layer.self_attn
        parts = [attn.q_proj, attn.k_proj, attn.v_proj]
        if all(isinstance(p, TunedLinear) for p in parts):
            attn.qkv = FusedProjection(*parts)
        elif all(isinstance(p, Int8Linear) and p.engine == p.FIRST for p in parts):
            attn.qkv = Int8Linear.joined(parts)
        else:
            continue
        attn.q_proj = attn.k_proj = attn.v_proj = None
    give_back_memory()


class TiedOutput:
    """The tied output layer's product for float32 on a CPU: x E^T + b over the embedding
    matrix E (column-major; the lookups read it too), with the kernel measured fastest for
    the row count, as a TunedLinear's (core.kernels, family "output"), where one more takes
    part: oneDNN's product over a packed copy of E, chosen where kernels.PACKED_WIN times
    faster (Zen 4 EPYC, 2 threads, a 58k x 512 matrix, ms: 4.8 against the plain matrix's best
    6.6 at 4 rows, 10.8 against 14.4 at 32; at one row 4.9 against 3.3). It cannot replace E,
    so it is made at the first call that asks for it and held beside E from then on (119 MB
    for that matrix): runs whose row counts never choose it (greedy, one sentence) never hold
    it, and a trial that rejects it frees it. It is packed in blocks of BLOCK rows, each
    copied first into one buffer (oneDNN packs a row-major matrix; E whole would be copied),
    so that making it never holds a third copy of E."""

    BLOCK = 8192

    def __init__(self):
        self.blocks: list[Tensor] | None = None  # the packed copy, BLOCK rows of E each
        self.kernels = {**kernels.KERNELS, "packed": self.packed}

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        chooser = kernels.chooser("output")
        key = chooser.key(weight.shape, kernels.rows(x))
        settled = key in chooser.table
        out = chooser.linear(x, weight, bias, self.kernels)  # (..., V)
        if not settled and chooser.table.get(key) not in (None, "packed") and self.blocks:
            self.blocks = None  # the trial that made it chose another kernel
            give_back_memory()
        return out

    def pack(self, weight: Tensor) -> None:
        """Make the packed copy of `weight` (E), unless it is there."""
        if self.blocks is None:
            self.blocks, rows = [], weight.new_empty(self.BLOCK, weight.size(1))  # (BLOCK, D)
            for i in range(0, weight.size(0), self.BLOCK):  # each block packed from `rows`
                block = rows[:weight.size(0) - i].copy_(weight[i:i + self.BLOCK])
                self.blocks.append(kernels.pack(block))
            del rows, block
            give_back_memory()

    def before_fork(self, weight: Tensor, threads: int) -> None:
        """Make the packed copy now if processes of `threads` threads chose it for some row
        count, so that workers forked next share it rather than each making their own."""
        if kernels.chooser("output", threads).chosen_anywhere(weight.shape, "packed"):
            self.pack(weight)

    def packed(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        self.pack(weight)
        out = x.new_empty(*x.shape[:-1], weight.size(0))  # (..., V)
        for i, block in enumerate(self.blocks):
            span = slice(i * self.BLOCK, (i + 1) * self.BLOCK)
            out[..., span] = kernels.onednn(x, block, None if bias is None else bias[span])
        return out


def check(dtype: str, device: torch.device) -> None:
    """Refuse a precision that does not exist or cannot run on `device`."""
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}'; choose from {', '.join(DTYPES)}")
    if dtype in ("int8", "float16") and device.type != "cpu":
        raise UsageError(f"--dtype {dtype} runs on the CPU; use --dtype bfloat16 on a GPU")


def slow(dtype: str, device: torch.device) -> str | None:
    """Why `dtype` runs several times slower than float32 on `device`, or None: bfloat16 on an
    x86 CPU without bfloat16 arithmetic (AVX512-BF16, AMX), where every operation converts to
    float32 and back (Zen 3 EPYC, benchmarks/ W3: 111 tokens/s, float32 632). Only x86 CPUs
    list `flags` in /proc/cpuinfo."""
    flags = machine.cpu_flags()
    if dtype == "bfloat16" and device.type == "cpu" and flags and not flags & {
            "avx512_bf16", "amx_bf16"}:
        return ("this CPU has no bfloat16 arithmetic (AVX512-BF16 or AMX): --dtype bfloat16 "
                "runs several times slower than float32 here; float16 and int8 read fewer bytes")
    return None


def tuned(dtype: str, device: torch.device) -> bool:
    return dtype == "float32" and device.type == "cpu"


def convert(model: nn.Module, name: str, tensors: dict, dtype: str, device: torch.device) -> None:
    """Give the module `name` of `model` its tensors (full names -> float32 tensors; for int8,
    a layer's weight may be anything quantize_rows reads, e.g. rows read from a file) in its
    form for `dtype`. Call it for the top-level module ("": the logits bias) first."""
    module = model.get_submodule(name) if name else model
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    weight, bias = tensors.get(f"{name}.weight"), tensors.get(f"{name}.bias")
    tied = name == "embed" and model.lm_head is None
    forms = {"int8": Int8Linear.from_float, "float16": Float16Linear}
    form = forms.get(dtype, TunedLinear if tuned(dtype, device) else None)
    if isinstance(module, nn.Linear) and form is not None:
        setattr(owner, child, form(weight, bias))
    elif name == "embed" and dtype == "int8":
        q, scale = quantize_rows(weight)
        model.embed = Int8Embeddings(q, scale, module.scale)
        if tied:  # the same int8 matrix, and the logits bias inside its kernel (a pass over
            # (N, V) saved per step)
            model.lm_head = Int8Linear(q, scale, model.logits_bias, shared=True)
            model.logits_bias = None
    elif name == "embed" and dtype == "float16":
        if tied:  # fbgemm packs a copy of its own; the logits bias is added after it
            model.lm_head = Float16Linear(weight)
        model.embed = Float16Embeddings(weight, module.scale)
    else:
        if tied and tuned(dtype, device):  # the output layer reads it too: column-major
            tensors = {**tensors, "embed.weight": column_major_in_huge_pages(weight)}
        if dtype == "bfloat16":
            tensors = {k: t.to(torch.bfloat16) for k, t in tensors.items()}
        start = len(name) + 1 if name else 0  # into the module itself: the whole model's
        # load_state_dict walks every module, and this runs once per module (~85 times)
        module.load_state_dict({k[start:]: t for k, t in tensors.items()}, strict=False,
                               assign=True)
        if tied and tuned(dtype, device):
            model.tied_linear = TiedOutput()


def quantized(model: nn.Module, name: str, dtype: str) -> bool:
    """Whether the weight of module `name` becomes int8 (so it can be read in slices)."""
    return dtype == "int8" and (name == "embed" or isinstance(model.get_submodule(name), nn.Linear))


def apply(model: nn.Module, dtype: str, device: torch.device) -> nn.Module:
    """Convert a whole float32 model in memory for inference in `dtype` (already `check`ed)."""
    state = model.state_dict()
    load(model, lambda name: state.pop(name).detach(), list(state), dtype, device)
    return model


def load(model: nn.Module, read, names: list[str], dtype: str, device: torch.device,
         rows=None) -> nn.Module:
    """Fill `model` (built on the meta device, or a float32 one) from `read(name)` (a float32
    tensor), module by module, largest first, each put into its form for `dtype` as soon as
    its tensors are in: no second copy of the model is ever held, at most two of one tensor.
    With `rows(name)` (an int8 matrix read slice by slice, see quantize_rows), not even that."""
    owners: dict[str, list[str]] = {}
    for name in names:
        owners.setdefault(name.rpartition(".")[0], []).append(name)
    sizes = {n: t.numel() for n, t in model.state_dict(keep_vars=True).items()}
    order = sorted(owners, key=lambda m: (m != "", -sum(sizes[n] for n in owners[m])))
    for module in order:
        slices = rows is not None and quantized(model, module, dtype)
        tensors = {n: rows(n) if slices and n.endswith(".weight") else read(n)
                   for n in owners[module]}
        convert(model, module, tensors, dtype, device)
        del tensors
        give_back_memory()
    if dtype == "bfloat16":
        model.to(torch.bfloat16)  # what no file holds: the sinusoid table
    fuse(model)  # its layers' types decide: float32's TunedLinear and int8's Int8Linear
    if tuned(dtype, device):
        # a decoding step's products read memory: one sentence's cross-attention K/V folded
        # through the projections take fewer bytes than the projections' weights
        model.fold_source = True
    return model


def before_fork(model: nn.Module, threads: int) -> None:
    """Ready `model` for worker processes of `threads` threads forked next: what each would
    make for itself on its first calls is made now, once, and shared."""
    if isinstance(getattr(model, "tied_linear", None), TiedOutput):
        model.tied_linear.before_fork(model.embed.weight, threads)
    for layer in model.modules():
        if isinstance(layer, Int8Linear):
            layer.before_fork(threads)


def column_major_in_huge_pages(weight: Tensor) -> Tensor:
    """A column-major copy of `weight` (out, in), in 2 MB pages where Linux gives them on
    request (transparent huge pages in "madvise" mode, as Ubuntu ships it): a decoding step
    with one row streams the tied output layer's whole matrix, and with 4 KB pages takes a TLB
    miss every 4 KB of it (opus-mt's 58k x 512 matrix, one sentence greedily, Zen 4 EPYC:
    1.014x, 1.019x, 1.053x and 1.059x, one process switching between two copies)."""
    return row_major_in_huge_pages(weight.t()).t()  # (out, in), strides (1, out)


def row_major_in_huge_pages(matrix: Tensor) -> Tensor:
    """A row-major copy of `matrix` in a private mapping of its own (core.cache's), in 2 MB pages
    where Linux gives them on request: one-row calls stream it whole every step, and from the
    heap it would lie in 4 KB pages (Zen 4 EPYC, the benchmark model's 24 decoder copies moved
    there, one process switching: float32 W1 1.063x and 1.025x as fast). Freed with the copy."""
    if not matrix.numel():
        return matrix.contiguous()
    memory = cache.Mappings.new(matrix.numel() * matrix.element_size())
    return torch.frombuffer(memory, dtype=matrix.dtype).view(matrix.shape).copy_(matrix)


def give_back_memory() -> None:
    """Return freed memory to the OS now. glibc keeps freed heap memory for reuse, and the
    float32 tensors freed between int8 layers fragment it so that it is not reused: the peak
    would grow by a third of the float32 model. About a millisecond a call."""
    libc = machine.glibc()
    if libc is not None:
        libc.malloc_trim(0)
