"""The one decoding loop: encode once, then step the model and a strategy until all end."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from core.model import Transformer
from core.search import NEG_INF, Step, Strategy, ban_repeats
from core.utf8 import Utf8Rule


def generate(model: Transformer, src: Tensor, src_mask: Tensor, strategy: Strategy, *,
             max_length: int | Tensor, min_length: int = 0, no_repeat_ngram: int = 0,
             utf8: Utf8Rule | None = None) -> Iterator[Step]:
    """Yield what each step settles for a batch (B, S) of source ids.

    EOS is forbidden before `min_length` tokens and forced after `max_length`, one limit for
    the batch or one per sentence (B,); padding and BOS are never generated. With
    `no_repeat_ngram` n, no row repeats an n-gram it already holds. With `utf8` (a byte-level
    vocabulary's rule), every row's bytes stay well-formed UTF-8. Finished sentences leave
    the working batch, and the cache follows the rows the strategy keeps."""
    cfg = model.cfg
    device = src.device
    limits = torch.as_tensor(max_length, device=device).expand(src.size(0))  # (B,)
    limits = limits.clamp(min=min_length, max=cfg.max_positions - 1)  # last position: EOS
    never = torch.tensor(sorted({cfg.pad_id, cfg.bos_id, cfg.decoder_start_id} - {cfg.eos_id}),
                         dtype=torch.long, device=device)
    eos = torch.tensor([cfg.eos_id], device=device)
    with torch.inference_mode():
        memory = model.encode(src, src_mask)  # (B, S, D): once per batch
        rows = strategy.start(src.size(0), device)
        row_limit = limits[rows]  # (N,) each row's limit follows it like its cache
        # cross-attention K/V once per batch; a sentence's beams share them
        cache = model.new_cache(memory, src_mask, group=strategy.group)
        tokens = torch.full((rows.numel(),), cfg.decoder_start_id, device=device)
        history = torch.zeros(rows.numel(), 0, dtype=torch.long, device=device)  # (N, t)
        state = utf8.start(rows.numel(), device) if utf8 is not None else None  # (N,)
    for t in range(int(limits.max()) + 1):
        with torch.inference_mode():
            logits, cache = model.decode_step(tokens, cache)  # (N, V), a fresh tensor
            logits = logits.float().index_fill_(1, never, NEG_INF)
            # normalised in place (out= the input: each row is read before it is written),
            # so that a step holds one (N, V) tensor, not two: 30 MB for 128 rows of 58k
            logprobs = torch.log_softmax(logits, -1, out=logits)
            at_limit = row_limit <= t  # (N,) only EOS is left; it keeps its log-probability
            kept = logprobs.index_select(1, eos) if at_limit.any() else None  # (N, 1)
            if utf8 is not None:  # bans EOS mid-character too: hence `kept` first
                logprobs = utf8.ban(logprobs, state)
            if no_repeat_ngram:
                logprobs = ban_repeats(logprobs, history, no_repeat_ngram)
            if t < min_length:  # masked after normalising, as Hugging Face does
                logprobs.index_fill_(1, eos, NEG_INF)
            if kept is not None:
                logprobs[at_limit] = NEG_INF
                logprobs.index_copy_(1, eos, kept)
            step, rows, tokens = strategy.step(logprobs)
            # freed before the next step makes its own: the two would otherwise be held
            # together, and a fresh (N, V) tensor each step is fresh pages to fault in (int8,
            # 128 beam rows of 58k: 270,000 page faults a pass, 50,000 so)
            del logits, logprobs
            if rows.numel():
                cache = cache.reorder(rows, strategy.group)
                row_limit = row_limit[rows]
                if utf8 is not None:
                    state = utf8.advance(state[rows], tokens)
                if no_repeat_ngram:
                    history = torch.cat([history[rows], tokens[:, None]], dim=1)
        yield step
        if not rows.numel():
            return
