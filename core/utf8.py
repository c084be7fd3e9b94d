"""Well-formed UTF-8 out of a byte-level vocabulary.

A byte-level BPE token may hold part of a character (ä is two bytes, each of which can be a
token of its own), so a decoder may pick a lead byte and then a token that does not continue
it. Decoded, that is U+FFFD in the middle of a translation; sampling does it often enough to
see. `Utf8Rule` bans, at each step, every token whose bytes could not follow the row's bytes so
far in well-formed UTF-8 (Unicode's Table 3-7: no stray continuation bytes, overlong forms,
surrogates or code points past U+10FFFF), and ends a row only after a whole character; only
a row cut at its length limit can end within one, which `unfinished()` tells the tokenizer."""

from __future__ import annotations

import torch
from torch import Tensor

# The states of a row's bytes: after a whole character (START), or within one, by what the
# next byte must be and how many more follow it.
START, CONT1, CONT2, CONT3, E0, ED, F0, F4 = range(8)
STATES = 8
BAD = -1


def next_state(state: int, byte: int) -> int:
    """The state after `byte`, or BAD where it cannot come next."""
    if state == START:
        if byte < 0x80:
            return START
        if 0xC2 <= byte <= 0xDF:
            return CONT1
        if 0xE1 <= byte <= 0xEF and byte != 0xED:
            return CONT2
        if 0xF1 <= byte <= 0xF3:
            return CONT3
        return {0xE0: E0, 0xED: ED, 0xF0: F0, 0xF4: F4}.get(byte, BAD)
    # the second byte's narrower ranges exclude overlong forms, surrogates, > U+10FFFF
    low, high, then = {CONT1: (0x80, 0xBF, START), CONT2: (0x80, 0xBF, CONT1),
                       CONT3: (0x80, 0xBF, CONT2), E0: (0xA0, 0xBF, CONT1),
                       ED: (0x80, 0x9F, CONT1), F0: (0x90, 0xBF, CONT2),
                       F4: (0x80, 0x8F, CONT2)}[state]
    return then if low <= byte <= high else BAD


def after(state: int, piece: bytes) -> int:
    """The state after all of `piece`'s bytes (BAD from the first that cannot come)."""
    for byte in piece:
        state = next_state(state, byte)
        if state == BAD:
            break
    return state


class Utf8Rule:
    """Which tokens may come next in each state, and the state each leads to (tables of
    STATES x V), for a vocabulary of byte strings: `pieces[i]` is what token i decodes to,
    None (or empty) for one that decodes to nothing, such as special tokens, which leaves the
    state as it was. A row starts in START; EOS is allowed in START alone."""

    def __init__(self, pieces: list[bytes | None], eos_id: int):
        ascii_only = [START] + [BAD] * (STATES - 1)  # most tokens: after a whole character
        whole = list(range(STATES))  # a token that decodes to nothing changes nothing
        then = torch.tensor([whole if not piece else ascii_only if piece.isascii() else
                             [after(s, piece) for s in range(STATES)] for piece in pieces]
                            ).T.contiguous()  # (STATES, V)
        allowed = then != BAD  # (STATES, V)
        allowed[1:, eos_id] = False  # a row ends after a whole character
        # a state no token with bytes continues (a vocabulary without single bytes) may end
        # broken, which beats no way on at all
        has_bytes = torch.tensor([bool(piece) for piece in pieces])  # (V,)
        allowed[~(allowed & has_bytes).any(1), eos_id] = True
        self.then, self.banned = then.clamp(min=START), ~allowed  # banned steps never taken
        self.banned_at_start = self.banned[START].nonzero()[:, 0]  # (K,)
        self.pieces = pieces

    def start(self, rows: int, device: torch.device) -> Tensor:
        self.then, self.banned = self.then.to(device), self.banned.to(device)
        self.banned_at_start = self.banned_at_start.to(device)
        return torch.full((rows,), START, dtype=torch.long, device=device)  # (N,)

    def ban(self, logprobs: Tensor, state: Tensor) -> Tensor:
        """-inf, in place, for the tokens each row (N, V) may not take in its state (N,).

        Rows between characters, nearly all of them, lose a few columns (the tokens that
        begin within a character); only rows within one are masked whole (Zen 4 EPYC, two
        threads, 128 rows of 8k: 0.46 ms a step with every row masked whole, 0.04-0.10 so)."""
        within = state.nonzero()[:, 0]  # (M,) START is 0
        held = logprobs.index_select(0, within)  # (M, V)
        logprobs.index_fill_(1, self.banned_at_start, float("-inf"))
        if within.numel():
            logprobs[within] = held.masked_fill_(self.banned[state[within]], float("-inf"))
        return logprobs  # (N, V)

    def unfinished(self, tokens: list[int]) -> bool:
        """Whether the bytes of `tokens` end within a character: with the start of one, well
        formed but not whole (which a decoder writes as one U+FFFD)."""
        tail = b"".join(self.pieces[t] or b"" for t in tokens)[-4:]
        starts = [i for i, byte in enumerate(tail) if not 0x80 <= byte <= 0xBF]
        return bool(starts) and after(START, tail[starts[-1]:]) not in (START, BAD)

    def advance(self, state: Tensor, tokens: Tensor) -> Tensor:
        """Each row's state (N,) after its next token (N,)."""
        return self.then[state, tokens]  # (N,)
