"""The tokenizer wrapper: exact round trips on any text and the special ids."""

import pytest

from core.tokenizer import Tokenizer, train_tokenizer

SAMPLES = [
    "A man is riding a bicycle.",
    "Grüße aus Köln: Äpfel, Öl, Übermut, façade, naïve",
    "日本語のテキストと中文",
    "Emoji 🚲🐕‍🦺 and flags 🇩🇪",
    "  leading and trailing spaces\tand a tab  ",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids[-1] == tokenizer.eos_id  # source ids end with EOS
    assert tokenizer.unk_id not in ids  # byte-level: nothing is unknown
    assert tokenizer.decode(ids) == text


def test_batches_agree_with_single_calls(tokenizer):
    assert tokenizer.encode_batch(SAMPLES) == [tokenizer.encode(t) for t in SAMPLES]
    assert tokenizer.decode_batch(tokenizer.encode_batch(SAMPLES)) == SAMPLES


def test_special_ids_and_save_load(tokenizer, tmp_path):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    tokenizer.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode(SAMPLES[1]) == tokenizer.encode(SAMPLES[1])
    assert again.vocab_size == tokenizer.vocab_size


def test_learns_frequent_words_as_single_tokens():
    """Training merges frequent words of both languages into single subwords."""
    from conftest import TEXTS

    joint = train_tokenizer(TEXTS * 4, vocab_size=600)
    assert len(joint.encode(" Mann")) == 2  # one subword + EOS
    assert len(joint.encode(" riding")) == 2
