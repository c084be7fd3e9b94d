"""The one decoding loop: encode once, then step the model and a strategy until all end."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from core.model import Transformer
from core.search import NEG_INF, Step, Strategy


def generate(model: Transformer, src: Tensor, src_mask: Tensor, strategy: Strategy, *,
             max_length: int, min_length: int = 0) -> Iterator[Step]:
    """Yield what each step settles for a batch (B, S) of source ids.

    EOS is forbidden before `min_length` tokens and forced after `max_length`; padding and BOS
    are never generated. Finished sentences leave the working batch, and the cache follows the
    rows the strategy keeps."""
    cfg = model.cfg
    max_length = min(max_length, cfg.max_positions - 1)  # the last position is for EOS
    device = src.device
    never = torch.tensor(sorted({cfg.pad_id, cfg.bos_id, cfg.decoder_start_id} - {cfg.eos_id}),
                         dtype=torch.long, device=device)
    eos = torch.tensor([cfg.eos_id], device=device)
    with torch.inference_mode():
        memory = model.encode(src, src_mask)  # (B, S, D): once per batch
        rows = strategy.start(src.size(0), device)
        # cross-attention K/V once per batch; a sentence's beams share them
        cache = model.new_cache(memory, src_mask, group=rows.numel() // src.size(0))
        tokens = torch.full((rows.numel(),), cfg.decoder_start_id, device=device)
    for t in range(max_length + 1):
        with torch.inference_mode():
            logits, cache = model.decode_step(tokens, cache)  # (N, V), a fresh tensor
            logprobs = logits.float().index_fill_(1, never, NEG_INF).log_softmax(-1)
            if t < min_length:  # masked after normalising, as Hugging Face does
                logprobs.index_fill_(1, eos, NEG_INF)
            if t == max_length:  # only EOS is left; it keeps its real log-probability
                logprobs = torch.full_like(logprobs, NEG_INF).index_copy_(
                    1, eos, logprobs.index_select(1, eos))
            step, rows, tokens = strategy.step(logprobs)
            if rows.numel():
                cache = cache.reorder(rows)
        yield step
        if not rows.numel():
            return
