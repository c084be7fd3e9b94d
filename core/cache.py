"""KVCache: the decoder's keys and values, passed into and returned from every decode step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KVCache:
    """Per decoder layer: self-attention K/V (grow by one position a step) and cross-attention
    K/V (projected once from the encoder output, never recomputed).

    Rows are hypotheses: one per sentence for greedy/sampling, beam_size per sentence for beam
    search. `reorder()` is the only way rows change."""

    self_k: list[Tensor]  # per layer (N, H, t, Dh)
    self_v: list[Tensor]  # per layer (N, H, t, Dh)
    cross_k: list[Tensor]  # per layer (N, H, S, Dh)
    cross_v: list[Tensor]  # per layer (N, H, S, Dh)
    memory_mask: Tensor  # (N, 1, 1, S) True where the source token is real
    length: int = 0  # target positions decoded so far

    def reorder(self, rows: Tensor) -> KVCache:
        """Keep, repeat and permute rows: row i of the result is row rows[i] of this cache.

        Drops finished sentences and follows beams to their origin in one index_select."""
        pick = lambda ts: [t.index_select(0, rows) for t in ts]  # noqa: E731
        return KVCache(pick(self.self_k), pick(self.self_v), pick(self.cross_k),
                       pick(self.cross_v), self.memory_mask.index_select(0, rows), self.length)

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add this step's self-attention K/V (N, H, 1, Dh) to a layer; return the full K/V."""
        self.self_k[layer] = torch.cat([self.self_k[layer], k], dim=2)  # (N, H, t+1, Dh)
        self.self_v[layer] = torch.cat([self.self_v[layer], v], dim=2)
        return self.self_k[layer], self.self_v[layer]
