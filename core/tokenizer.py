"""A thin wrapper over `tokenizers.Tokenizer`, and training of a joint subword vocabulary."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from core.errors import ModelError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIALS = [PAD, UNK, BOS, EOS]  # ids 0..3 in vocabularies we train


class Tokenizer:
    """Text <-> token ids. Source ids end with EOS; decoding drops special tokens."""

    def __init__(self, tokenizer: HFTokenizer):
        self.hf = tokenizer
        ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIALS}
        missing = [tok for tok, i in ids.items() if i is None]
        if missing:
            raise ModelError(f"tokenizer lacks the special token(s) {' '.join(missing)}")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (ids[t] for t in SPECIALS)

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            if not Path(path).is_file():
                raise ModelError(f"{path} is missing") from None
            raise ModelError(f"{path} is not a valid tokenizer file ({exc})") from None

    def save(self, path: Path) -> None:
        self.hf.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Source side: subword ids followed by EOS."""
        return [enc.ids + [self.eos_id] for enc in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return self.hf.decode_batch(batch, skip_special_tokens=True)


def new_bpe() -> HFTokenizer:
    """Byte-level BPE: any input text round-trips exactly (NFC-normalised), with no <unk>."""
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterator[str] | list[str], vocab_size: int, *,
                    min_frequency: int = 2) -> Tokenizer:
    """Learn one subword vocabulary for source and target text together."""
    tok = new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)
