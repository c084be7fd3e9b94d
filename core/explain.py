"""What the model thinks of its translation: each target token's probability and the
cross-attention from target to source tokens.

Both come from one teacher-forced pass over the finished translation (the decoder run over the
best hypothesis's tokens at once), made only when asked, so ordinary decoding keeps no weights
and pays nothing. The probabilities are the decoding loop's: softmax over the vocabulary with
the tokens it never generates (padding, the start token) left out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core import segment
from core.model import attention_probs
from core.search import NEG_INF, DecodeOptions
from core.translator import Translator


@dataclass
class Explanation:
    """One translated sentence, token by token."""

    source: list[str]  # source tokens as text, EOS included (" </s>")
    target: list[str]  # target tokens as text, EOS left out; joined they make the translation
    logprobs: list[float]  # of each target token, given the source and the tokens before it
    end: float  # log-probability of ending the translation there (EOS)
    attention: Tensor  # (T, S): target token -> source token weights, each row sums to 1

    def words(self) -> list[tuple[str, float, list[int]]]:
        """Target words: (text with its leading space, probability of the word (its tokens'
        probabilities multiplied), its token indices). A token that starts with a space
        starts a word."""
        return [(text, float(torch.tensor([self.logprobs[i] for i in ids]).sum().exp()), ids)
                for text, ids in group(self.target)]

    def source_words(self) -> list[tuple[str, list[int]]]:
        return group(self.source)

    def word_attention(self) -> Tensor:
        """(target words, source words): a target word's rows averaged, a source word's
        columns summed, so each row still sums to 1."""
        rows = torch.stack([self.attention[ids].mean(0) for _, _, ids in self.words()])
        return torch.stack([rows[:, ids].sum(1) for _, ids in self.source_words()], dim=1)


def group(pieces: list[str]) -> list[tuple[str, list[int]]]:
    """Tokens into words: (text, token indices); a token that starts with a space (or a
    special token) starts a word."""
    words: list[tuple[str, list[int]]] = []
    for i, piece in enumerate(pieces):
        if not words or piece[:1].isspace() or piece.startswith(("</s>", ">>")):
            words.append((piece, [i]))
        else:
            words[-1] = (words[-1][0] + piece, words[-1][1] + [i])
    return words


def pieces(translator: Translator, ids: list[int]) -> list[str]:
    """Each token's own text, as it appears in the decoded string (with its leading space). A
    token holding part of a character gets "", the one that completes it the character."""
    out, text = [], ""
    for n in range(1, len(ids) + 1):
        full = translator.tokenizer.decode(ids[:n])
        if full.endswith("\ufffd") or not full.startswith(text):
            out.append("")  # an incomplete character, or a merge still settling
            continue
        out.append(full[len(text):])
        text = full
    if out:
        out[-1] += translator.tokenizer.decode(ids)[len(text):]  # whatever is still held back
    return out


def attention_weights(model, tgt_in: Tensor, memory: Tensor, src_mask: Tensor,
                      layer: int) -> Tensor:
    """Logits (1, T, V) of the teacher-forced decoder and the cross-attention weights of
    decoder layer `layer`, averaged over heads (T, S), caught on the way through."""
    attn = model.decoder[layer].cross_attn
    caught = {}

    def hook(module, args):
        q, k, _, mask = args  # (1, H, T, Dh), (1, H, S, Dh)
        caught["weights"] = attention_probs(q.float(), k.float(), mask).mean(1)[0]  # (T, S)

    handle = attn.register_forward_pre_hook(hook)
    try:
        logits = model.decode(tgt_in, memory, src_mask)  # (1, T, V)
    finally:
        handle.remove()
    return logits, caught["weights"]


def explain(translator: Translator, line: str, options: DecodeOptions, layer: int = -1
            ) -> list[Explanation]:
    """Each translated sentence of `line`: its best translation by `options`, and what the
    model thinks of it (see Explanation). Protected spans stay placeholders (<x1>)."""
    model, tok = translator.model, translator.tokenizer
    cfg = model.cfg
    if not -len(model.decoder) <= layer < len(model.decoder):
        from core.errors import UsageError

        raise UsageError(f"the model has {len(model.decoder)} decoder layers; --layer "
                         f"{layer} is not one of them")
    strategy = options.make(tok.eos_id)
    found = []
    for sentence in segment.split(line, translator.source_lang):
        if not sentence.translate:
            continue
        ids = tok.encode(sentence.text)[: cfg.max_positions]
        _, hyps = next(translator._decode_batch([ids], options, strategy,
                                                [options.limit(len(ids))]))
        target = hyps[0].tokens
        src, mask = translator.pad([ids])
        tgt_in = torch.tensor([[cfg.decoder_start_id] + target], device=src.device)
        never = sorted({cfg.pad_id, cfg.bos_id, cfg.decoder_start_id} - {cfg.eos_id})
        with torch.inference_mode():
            memory = model.encode(src, mask)
            logits, weights = attention_weights(model, tgt_in, memory, mask, layer)
            logits = logits[0].float()
            logits[:, never] = NEG_INF
            logprobs = logits.log_softmax(-1).gather(
                1, torch.tensor(target + [tok.eos_id], device=src.device)[:, None])[:, 0]
        labels = [piece if piece.strip() else " " + tok_piece(translator, i)
                  for i, piece in zip(ids, pieces(translator, ids))]
        found.append(Explanation(source=labels, target=pieces(translator, target),
                                 logprobs=logprobs[:-1].tolist(), end=float(logprobs[-1]),
                                 attention=weights[:-1].cpu()))
    return found


def tok_piece(translator: Translator, token: int) -> str:
    """A special token's name (</s>, >>fra<<), which decoding leaves out."""
    return next((p for p, i in translator.tokenizer.vocab.items() if i == token), "?")
