"""Well-formed UTF-8 out of byte-level vocabularies: the byte automaton against Python's own
decoder, the rule's tables against the bytes of every token sequence, and the tokenizer's
byte pieces against what it decodes."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from core.tokenizer import SPECIALS, Tokenizer, sentencepiece_decoder
from core.utf8 import BAD, START, STATES, Utf8Rule, after


def character_starts() -> frozenset[bytes]:
    """Every proper prefix of a character's UTF-8 bytes (the incomplete ends a string may have)."""
    starts = set()
    for c in range(0x80, 0x110000):
        if not 0xD800 <= c <= 0xDFFF:
            data = chr(c).encode()
            starts.update(data[:k] for k in range(1, len(data)))
    return frozenset(starts)


CHARACTER_STARTS = character_starts()


def prefix_of_utf8(data: bytes) -> bool:
    """Whether some bytes could follow `data` to make well-formed UTF-8: whole characters and
    then at most the start of one (Python's own incremental decoder lets ED A0 through)."""
    return any(whole_utf8(data[:len(data) - k]) and data[len(data) - k:] in CHARACTER_STARTS
               for k in range(1, min(3, len(data)) + 1)) or whole_utf8(data)


def whole_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# bytes around every boundary of Table 3-7, so that short random strings hit them often
EDGES = [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xA4, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3,
         0xDF, 0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]
BYTES = st.lists(st.sampled_from(EDGES) | st.integers(0, 255), max_size=8).map(bytes)


@settings(max_examples=2000, deadline=None)
@given(BYTES)
def test_the_automaton_accepts_what_python_decodes(data):
    """A byte string leaves the automaton in a state exactly when it begins well-formed UTF-8,
    and at START exactly when it is whole."""
    state = after(START, data)
    assert (state != BAD) == prefix_of_utf8(data)
    assert (state == START) == whole_utf8(data)


EOS = 3
PIECES = [None, None, None, None,  # <pad> <unk> <s> </s>
          b"a", b" ", b"\xc3", b"\xa4", b"\xc3\xa4", b"\xe2\x82", b"\xac", b"\xac a",
          b"\xe0", b"\x80", b"\xed\xa0", b"\xf0\x9f", b"\x9a\xb2", b"\xf4\x90", b""]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(4, len(PIECES) - 1), max_size=6))
def test_the_rule_allows_a_token_exactly_where_the_bytes_stay_well_formed(tokens):
    """Walking any token sequence, the rule bans a token exactly when the bytes so far plus its
    own could no longer be well-formed, and EOS exactly when they are not whole (when they end
    unfinished)."""
    rule = Utf8Rule(PIECES, EOS)
    state, text = rule.start(1, torch.device("cpu")), b""
    for n, token in enumerate(tokens):
        logprobs = rule.ban(torch.zeros(1, len(PIECES)), state)
        for other, piece in enumerate(PIECES):
            if piece is not None:
                allowed = prefix_of_utf8(text + piece)
                assert (logprobs[0, other] == 0) == allowed, (text, piece)
        assert (logprobs[0, EOS] == 0) == whole_utf8(text)
        if not prefix_of_utf8(text + PIECES[token]):
            break
        text += PIECES[token]
        state = rule.advance(state, torch.tensor([token]))
        assert state.tolist() == [after(START, text)]
        assert rule.unfinished(tokens[:n + 1]) == (state.item() != START)


def test_a_state_no_token_continues_may_still_end():
    """Where a vocabulary lacks the bytes to finish a character, EOS stays open rather than
    leave the row nothing to choose."""
    rule = Utf8Rule([None, None, None, None, b"a", b"\xc3"], EOS)
    state = rule.advance(rule.start(1, torch.device("cpu")), torch.tensor([5]))
    logprobs = rule.ban(torch.zeros(1, 6), state)
    assert logprobs[0].isfinite().tolist() == [True, True, True, True, False, False]


def test_byte_level_pieces_are_the_bytes_each_token_decodes_to(tokenizer):
    """The rule reads each token of a byte-level vocabulary as the decoder does: a token is
    whole characters exactly when it decodes without U+FFFD, and special tokens are nothing.
    Added tokens too, which the decoder maps byte by byte where it can ("Ã" is byte C3)."""
    target = HFTokenizer.from_str(tokenizer.target.to_str())
    target.add_tokens(["Āb", "€x", "Ãx"])
    added = Tokenizer(target)
    rule = added.utf8_rule
    assert rule is not None and rule.then.shape == (STATES, added.vocab_size)
    parts = 0
    for piece, i in added.vocab.items():
        text = target.decode([i])  # the decoder itself: the wrapper drops unfinished characters
        if piece in SPECIALS:
            assert text == "" and rule.then[:, i].tolist() == list(range(STATES))
        else:
            whole = not rule.banned[START, i] and rule.then[START, i] == START
            assert whole == ("\ufffd" not in text), piece
            parts += not whole
    assert parts > 0  # the test vocabulary splits ä, ö, ü, ß into bytes somewhere


def test_whole_piece_vocabularies_need_no_rule(tokenizer):
    """SentencePiece (Marian) targets are whole strings: nothing to guard."""
    target = sentencepiece_decoder({"<pad>": 0, "<unk>": 1, "</s>": 2, "▁Grüße": 3}, SPECIALS)
    assert Tokenizer(tokenizer.source, target).utf8_rule is None


def test_a_translation_cut_within_a_character_loses_that_character_not_its_text(tokenizer):
    """Decoding drops the unfinished last character of a cut translation, which the decoder
    alone writes as U+FFFD, and keeps a U+FFFD the text itself holds."""
    ids = tokenizer.encode("Grüße aus Köln")[:-1]  # without EOS
    raw = [tokenizer.target.decode(ids[:n]) for n in range(len(ids) + 1)]
    cuts = [n for n, text in enumerate(raw) if text.endswith("\ufffd")]
    assert cuts  # the test vocabulary splits ü, ß or ö somewhere
    for n in cuts:
        assert tokenizer.decode(ids[:n]) == raw[n][:-1]
        assert "\ufffd" not in tokenizer.decode(ids[:n])
    assert tokenizer.decode(tokenizer.encode("kaputt \ufffd")) == "kaputt \ufffd"
