"""The one decoding loop: encode once, then step the model and a strategy until all end."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from core.model import Transformer
from core.search import Step, Strategy, forbid


def generate(model: Transformer, src: Tensor, src_mask: Tensor, strategy: Strategy, *,
             max_length: int, min_length: int = 0) -> Iterator[Step]:
    """Yield what each step settles for a batch (B, S) of source ids.

    EOS is forbidden before `min_length` tokens and forced after `max_length`; padding and BOS
    are never generated. Finished sentences leave the working batch, and the cache follows the
    rows the strategy keeps."""
    cfg = model.cfg
    max_length = min(max_length, cfg.max_positions - 1)  # the last position is for EOS
    never = sorted({cfg.pad_id, cfg.bos_id, cfg.decoder_start_id} - {cfg.eos_id})
    not_eos = [i for i in range(cfg.vocab_size) if i != cfg.eos_id]
    with torch.inference_mode():
        memory = model.encode(src, src_mask)  # (B, S, D): once per batch
        cache = model.new_cache(memory, src_mask)  # cross-attention K/V: once per batch
        rows = strategy.start(src.size(0), src.device)
        if rows.numel() != src.size(0):
            cache = cache.reorder(rows)  # beams copy their sentence's rows; nothing recomputed
        tokens = torch.full((rows.numel(),), cfg.decoder_start_id, device=src.device)
    for t in range(max_length + 1):
        with torch.inference_mode():
            logits, cache = model.decode_step(tokens, cache)  # (N, V)
            logprobs = forbid(logits.float(), never).log_softmax(-1)
            if t < min_length:
                logprobs = forbid(logprobs, [cfg.eos_id])
            if t == max_length:
                logprobs = forbid(logprobs, not_eos)
            step, rows, tokens = strategy.step(logprobs)
            if rows.numel():
                cache = cache.reorder(rows)
        yield step
        if not rows.numel():
            return
