"""KVCache: the decoder's keys and values, passed into and returned from every decode step."""

from __future__ import annotations

import contextlib
import math
import mmap
import sys
import threading
from dataclasses import dataclass, replace

import torch
from torch import Tensor


def is_identity(index: Tensor, n: int) -> bool:
    """Whether `index` selects all n rows in order, so selecting would copy for nothing."""
    return index.numel() == n and torch.equal(index, torch.arange(n, device=index.device))


class Mappings:
    """The memory of the cache's buffers: private anonymous mappings of their own (see
    outside_heap), kept when no tensor holds them any more and handed out again, the largest
    free one that fits first, so that a batch reuses the last one's grown buffers whole.

    Fresh memory costs its first touch: on a VM whose host takes freed guest memory back (free
    page reporting, as on the Zen 3 EPYC of benchmarks/), about 1.5 ms per 2 MB page, and beam
    search made its buffers anew as they grew, 290 MB a batch of 32 sentences x 4 beams of the
    benchmark's model, against 117 MB kept and reused. One process switching between the two
    there: W4 float32 1.071x, int8 on one thread 1.047x, W3 int8 on one thread 1.027x, the
    same translations. A request that no free mapping fits unmaps the free ones first (too
    small for a cache that grows), so what is kept stays about the largest batch's cache so
    far, held between batches as torch's own allocators hold theirs."""

    def __init__(self):
        self.kept: list[mmap.mmap] = []
        self.lock = threading.Lock()  # one mapping never goes to two threads' caches
        self.kept.append(self.new(mmap.PAGESIZE))
        self.alone = self.refs(0)  # the references a mapping that nothing else holds shows
        self.kept.clear()

    def refs(self, i: int) -> int:
        # a tensor over a mapping (torch.frombuffer) holds a reference to it until its storage
        # is freed, views included; counted in this one expression, so that `alone` matches
        return sys.getrefcount(self.kept[i])

    def take(self, shape: tuple[int, ...], like: Tensor, room: int) -> Tensor:
        numel = math.prod(shape)
        nbytes = numel * like.element_size()
        with self.lock:
            free = [i for i in range(len(self.kept)) if self.refs(i) == self.alone]
            fits = [i for i in free if len(self.kept[i]) >= nbytes]
            if fits:
                memory = self.kept[max(fits, key=lambda i: len(self.kept[i]))]
            else:
                self.kept = [m for i, m in enumerate(self.kept) if i not in free]
                memory = self.new(max(numel, room) * like.element_size())
                self.kept.append(memory)
            # the whole mapping, so that room() sees all of it: a reorder grows into it
            whole = torch.frombuffer(memory, dtype=like.dtype,
                                     count=len(memory) // like.element_size())
            return whole[:numel].view(shape)

    @staticmethod
    def new(nbytes: int) -> mmap.mmap:
        if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: no flags, and no huge pages on request
            return mmap.mmap(-1, nbytes)
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):  # fresh pages come zeroed: 2 MB ones fault 512x less
            memory.madvise(mmap.MADV_HUGEPAGE)
        return memory


MAPPINGS = Mappings()


def outside_heap(shape: tuple[int, ...], like: Tensor, room: int = 0) -> Tensor:
    """An uninitialised contiguous tensor of `shape`, `like`'s dtype and device; on the CPU in
    a private anonymous mapping of its own (from MAPPINGS; a new one holds at least `room`
    elements, for a buffer that grows), in 2 MB pages where Linux gives them on request; its
    storage is the whole mapping (see room()). In the heap, the cache's buffers, made and freed
    at other moments than a step's other tensors, leave holes that glibc keeps: for 128 beam
    rows of a 6-layer, 512-wide decoder, 50-90 MB more peak memory (Zen 4 EPYC, int8, four
    passes of W4 of benchmarks/: 708-727 MB in the heap, 601-667 outside; 623-651 before a
    reorder laid the cache out tight), at the same speed (one process switching: W4 0.989x, W3
    1.012x). Private, not mmap's default of shared: shared anonymous memory is shmem, which
    Linux gives no 2 MB pages unless configured to (shmem_enabled), and whose 4 KB faults cost
    more (int8 W4, one thread, one process switching: page faults 196k a pass shared, 87k
    private, 1.06x as fast)."""
    if like.device.type != "cpu" or math.prod(shape) == 0:
        return like.new_empty(shape)
    return MAPPINGS.take(shape, like, room)


def room(buffer: Tensor) -> int:
    """How many elements `buffer`'s storage holds, whatever part of it the view covers."""
    return buffer.untyped_storage().nbytes() // buffer.element_size()


@dataclass
class KVCache:
    """Per decoder layer: self-attention K/V, written one position a step into preallocated
    buffers (capacity doubles when full), and cross-attention K/V, projected once from the
    encoder output and kept once per sentence. A reorder that moves rows copies them anyway,
    and lays them out tight for the next step; where none moves (greedy decoding, as long as
    no sentence ends) they stay where they are: copying them tight every step costs what the
    tighter reads save (Zen 4 EPYC, W3 of benchmarks/: 0.999-1.006x; W1 0.95x).

    Rows are hypotheses, `group` consecutive rows per sentence: 1 for greedy and sampling,
    the beam size for beam search. A sentence's rows all read its one copy of the cross K/V, so
    beams never copy it. `reorder()` is the only way rows change.

    Folded (`cross_bias` set; core.model.MultiHeadAttention.fold), the cross K/V are the keys
    carried through the query projection and the values through the output projection, and
    `cross_bias` holds the scores the query bias adds, -inf at the padding."""

    self_k: list[Tensor]  # per layer (N, H, capacity, Dh); positions from `length` on unused
    # (after a reorder capacity is length + 1; the storage may hold more, see spare_as)
    self_v: list[Tensor]  # per layer (N, H, capacity, Dh)
    cross_k: list[Tensor]  # per layer (n, H, S, Dh), n = N / group sentences; folded (n, H*S, D)
    cross_v: list[Tensor]  # per layer (n, H, S, Dh); folded (n, H*S, D)
    memory_mask: Tensor  # (n, 1, 1, S) True where the source token is real
    group: int = 1  # decoder rows per sentence
    length: int = 0  # target positions decoded so far
    spare: Tensor | None = None  # a freed buffer that the next reorder() copies into
    cross_bias: list[Tensor] | None = None  # folded: per layer (n, 1, H*S)

    def reorder(self, rows: Tensor, group: int | None = None) -> KVCache:
        """Keep, repeat and permute rows: row i of the result is row rows[i] of this cache,
        which has `group` rows per sentence (left None: as many as this one).

        Follows beams to their origin, drops finished sentences, and gives each sentence its
        beams after beam search's first step. Each run of `group` rows must come from one
        sentence; the cross K/V are only touched when the sentences change.
        This cache is spent: its self-attention buffers move into the result, one layer at a
        time, so that a step never holds more than one layer's buffer beside them (they are
        most of its memory)."""
        N, n = self.self_k[0].size(0), self.memory_mask.size(0)
        group = self.group if group is None else group
        if is_identity(rows, N):
            return self  # nothing moved: greedy steps where no sentence ended
        self_k, self_v = self.take_rows(self.self_k, rows), self.take_rows(self.self_v, rows)
        sentences = rows.view(-1, group)[:, 0] // self.group  # (n',)
        if is_identity(sentences, n):
            return replace(self, self_k=self_k, self_v=self_v, group=group)

        def pick(ts: list[Tensor] | None) -> list[Tensor] | None:
            return None if ts is None else [t.index_select(0, sentences) for t in ts]

        return replace(self, self_k=self_k, self_v=self_v, cross_k=pick(self.cross_k),
                       cross_v=pick(self.cross_v), cross_bias=pick(self.cross_bias),
                       memory_mask=self.memory_mask.index_select(0, sentences), group=group)

    def take_rows(self, buffers: list[Tensor], rows: Tensor) -> list[Tensor]:
        """Buffers holding `rows` of the old ones (`buffers` empties), only the written
        positions copied, each laid out tight: its t positions and room for the next, and no
        gap between one (row, head)'s positions and the next's. Attention reads a layout with
        gaps 2-3x slower (Zen 4 EPYC, one thread, 128 rows of 8 heads, q k^T over 16 of 32
        positions: 0.65 ms, over 16 of 17: 0.21).

        Each layer is copied into the spare storage, and its old one becomes the spare for the
        next: a beam search step seldom makes a storage here (a new one has room for as many
        positions again), where a dozen fresh 8 MB buffers a step (128 beam rows of a 6-layer,
        512-wide decoder) would each be paged in anew."""
        t, picked = self.length, []
        # out= copies cannot be differentiated, and a cache needs not: where autograd is on (a
        # cache used outside inference), each copy goes without it; entering no_grad for every
        # copy cost 3.5 us each, 12 a step (Zen 3 EPYC)
        unrecorded = torch.no_grad if torch.is_grad_enabled() else contextlib.nullcontext
        while buffers:
            buffer = buffers.pop(0)
            _, H, _, Dh = buffer.shape
            out = self.spare_as((rows.numel(), H, t + 1, Dh), buffer)  # (N', H, t + 1, Dh)
            with unrecorded():
                torch.index_select(buffer.narrow(2, 0, t), 0, rows, out=out.narrow(2, 0, t))
            picked.append(out)
            self.spare = buffer
        return picked

    def spare_as(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A contiguous `shape` in the spare buffer's storage (all of it, whatever part its
        view covered) where that is large enough, else in another (outside_heap: a kept one
        that fits, or a new one as large as `like`'s or twice what `shape` needs, whichever is
        more)."""
        spare, self.spare = self.spare, None
        need = math.prod(shape)
        if spare is None or room(spare) < need:
            return outside_heap(shape, like, room=max(room(like), 2 * need))
        return spare.as_strided((need,), (1,), 0).view(shape)

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's self-attention K/V (N, H, 1, Dh) into a layer at position
        `length`; return the layer's K/V so far, (N, H, length + 1, Dh) views."""
        t = self.length
        if t == self.self_k[layer].size(2):  # full: double the capacity
            for buffers in (self.self_k, self.self_v):
                full = buffers[layer]
                N, H, capacity, Dh = full.shape
                buffers[layer] = outside_heap((N, H, 2 * capacity, Dh), full)
                buffers[layer][:, :, :t] = full
        self.self_k[layer][:, :, t: t + 1] = k
        self.self_v[layer][:, :, t: t + 1] = v
        return self.self_k[layer][:, :, : t + 1], self.self_v[layer][:, :, : t + 1]
