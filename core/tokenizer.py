"""A thin wrapper over `tokenizers.Tokenizer`; training of a joint subword vocabulary; and the
conversion of SentencePiece models (Marian) into `tokenizers` form."""

from __future__ import annotations

import copy
import difflib
import functools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from core.errors import ModelError, TranslateError, UsageError
from core.utf8 import Utf8Rule

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIALS = [PAD, UNK, BOS, EOS]  # ids 0..3 in vocabularies we train
SPACE = "\u2581"  # SentencePiece's visible space, "▁"


class Tokenizer:
    """Text <-> token ids. Source text is encoded (ids end with EOS); target ids are decoded
    (special tokens dropped).

    Our own models share one tokenizer between both sides. Marian models have one
    SentencePiece model per side over one vocabulary: then `target` holds that vocabulary (the
    model's ids) and decodes, and `source` segments text into pieces that are looked up in it
    by string, as Marian does, so a piece the vocabulary lacks becomes <unk>.

    BOS is <s> where the vocabulary has it; Marian has none (its decoder starts from <pad>), so
    bos_id falls back to pad_id, an id the decoding loop never generates anyway."""

    def __init__(self, source: HFTokenizer, target: HFTokenizer | None = None):
        self.source = source
        self.target = target if target is not None else source
        self.vocab = self.target.get_vocab()  # piece -> model id
        missing = [tok for tok in (PAD, UNK, EOS) if tok not in self.vocab]
        if missing:
            raise ModelError(f"tokenizer lacks the special token(s) {' '.join(missing)}")
        self.pad_id, self.unk_id, self.eos_id = self.vocab[PAD], self.vocab[UNK], self.vocab[EOS]
        self.bos_id = self.vocab.get(BOS, self.pad_id)
        # multilingual Marian models pick the output language with a first token like >>fra<<
        self.languages = sorted(t for t in self.vocab if re.fullmatch(r">>\w+<<", t))
        self.prefix: list[int] = []  # the chosen language token, before every source sentence

    @property
    def shared(self) -> bool:
        return self.source is self.target

    @classmethod
    def load(cls, path: Path, target_path: Path | None = None) -> Tokenizer:
        """One file for both sides, or a source and a target file."""
        source = read(path)
        return cls(source, read(target_path) if target_path is not None else None)

    def save(self, path: Path, target_path: Path | None = None) -> None:
        self.source.save(str(path))
        if not self.shared:
            if target_path is None:
                raise ValueError("a two-sided tokenizer needs a target path to save to")
            self.target.save(str(target_path))

    @property
    def vocab_size(self) -> int:
        return self.target.get_vocab_size()

    def with_target_language(self, code: str) -> Tokenizer:
        """A copy that starts every source sentence with the language token of `code`
        ("fra" or ">>fra<<"), for multilingual models."""
        token = code if code.startswith(">>") else f">>{code}<<"
        if not self.languages:
            raise UsageError("this model has no target-language tokens; --to is only for "
                             "multilingual models")
        if token not in self.vocab:
            names = [t[2:-2] for t in self.languages]
            close = difflib.get_close_matches(token[2:-2], names, n=3, cutoff=0.5)
            hint = (f"did you mean {' or '.join(close)}?" if close else
                    f"this model knows {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
            raise UsageError(f"unknown target language '{code}'; {hint}")
        tokenizer = copy.copy(self)
        tokenizer.prefix = [self.vocab[token]]
        return tokenizer

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Source side: [language token] + subword ids + EOS."""
        prefixes = [self.prefix] * len(texts)
        if self.languages:  # a line may name its own language, as Marian reads ">>fra<< text"
            split = [self.split_language(t) for t in texts]
            prefixes, texts = [p for p, _ in split], [t for _, t in split]
        encodings = self.source.encode_batch(texts, add_special_tokens=False)
        if self.shared:
            ids = [enc.ids for enc in encodings]
        else:  # source pieces -> model ids, by string
            ids = [[self.vocab.get(tok, self.unk_id) for tok in enc.tokens] for enc in encodings]
        return [p + x + [self.eos_id] for p, x in zip(prefixes, ids)]

    def split_language(self, text: str) -> tuple[list[int], str]:
        """A leading >>code<< becomes its own token (unknown codes become <unk>, as in Marian)."""
        end = text.find("<<")
        if text.startswith(">>") and end != -1:
            return [self.vocab.get(text[: end + 2], self.unk_id)], text[end + 2:]
        return self.prefix, text

    def decode(self, ids: Iterable[int]) -> str:
        """Target ids -> text. Decoding keeps every character whole (utf8_rule) but one cut at
        the length limit, whose start is dropped here rather than written as U+FFFD."""
        ids = list(ids)
        text = self.target.decode(ids, skip_special_tokens=True)
        rule = self.utf8_rule if text.endswith("\ufffd") else None
        return text[:-1] if rule is not None and rule.unfinished(ids) else text

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    @functools.cached_property
    def utf8_rule(self) -> Utf8Rule | None:
        """What keeps decoding to whole characters where target tokens are bytes (byte-level
        BPE), so may split one; None where every token is whole text (SentencePiece)."""
        if not isinstance(self.target.decoder, decoders.ByteLevel):
            return None
        byte_of = {char: byte for byte, char in enumerate(BYTE_CHARS)}
        special = {i for i, token in self.target.get_added_tokens_decoder().items()
                   if token.special}
        pieces: list[bytes | None] = [None] * self.target.get_vocab_size()  # special: nothing
        for piece, i in self.vocab.items():
            if i not in special:  # as ByteLevel decodes: its characters' bytes, if all have one
                chars = [byte_of.get(char) for char in piece]
                pieces[i] = piece.encode() if None in chars else bytes(chars)
        return Utf8Rule(pieces, self.eos_id)


def read(path: Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        if not Path(path).is_file():
            raise ModelError(f"{path} is missing") from None
        raise ModelError(f"{path} is not a valid tokenizer file ({exc})") from None


def byte_chars() -> str:
    """The character ByteLevel writes for each byte 0-255 (GPT-2's table): printable Latin-1
    stands for itself, every other byte for 256 + its rank among them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = iter(range(256, 512))
    return "".join(chr(b) if b in printable else chr(next(others)) for b in range(256))


BYTE_CHARS = byte_chars()


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


# ---- SentencePiece --------------------------------------------------------------------------

def read_sentencepiece(data: bytes, name: str):
    """Parse a SentencePiece model file with the protobuf schema the sentencepiece package
    ships (the `marian` extra)."""
    try:
        from google.protobuf.message import DecodeError
        from sentencepiece import sentencepiece_model_pb2
    except Exception:  # ImportError, or a protobuf runtime too old for the generated schema
        raise TranslateError("importing Marian models needs SentencePiece and protobuf: "
                             "pip install 'translate[marian]'") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise ModelError(f"{name} is not a SentencePiece model ({exc})") from None
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    unsupported = [why for bad, why in [
        (spec.model_type != spec.UNIGRAM, "a model type other than unigram"),
        (spec.byte_fallback, "byte fallback"),
        (spec.treat_whitespace_as_suffix, "whitespace as suffix"),
        (not norm.escape_whitespaces, "unescaped whitespace"),
        (bool(proto.denormalizer_spec.precompiled_charsmap), "a denormalizer"),
    ] if bad]
    if unsupported:
        raise ModelError(f"{name} uses {unsupported[0]}, which this SentencePiece import does "
                         "not support")
    types = {p.type for p in proto.pieces}
    if proto.SentencePiece.NORMAL not in types or proto.SentencePiece.UNKNOWN not in types:
        raise ModelError(f"{name} has no pieces or no unknown-token piece")
    return proto


def sentencepiece_encoder(proto, specials: list[str]) -> HFTokenizer:
    """The source side of a SentencePiece model as a `tokenizers` Unigram: same pieces and
    scores, its normalizer, and Metaspace for the dummy prefix; `specials` are split out of the
    text first, as Marian's tokenizer does.

    Pieces keep their strings, not their SentencePiece ids: they are mapped to model ids later."""
    Piece = proto.SentencePiece
    max_score = max(p.score for p in proto.pieces if p.type == Piece.NORMAL)
    vocab, unk_id = [], 0
    for p in proto.pieces:
        if p.type in (Piece.CONTROL, Piece.UNUSED):
            continue  # never matched in text by SentencePiece
        if p.type == Piece.UNKNOWN:
            unk_id = len(vocab)
        # SentencePiece gives user-defined symbols a bonus so that they always win
        score = len(p.piece) * max_score + 1.0 if p.type == Piece.USER_DEFINED else p.score
        vocab.append((p.piece, score))
    tok = HFTokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=False))
    norm = proto.normalizer_spec
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:  # on plain spaces only, after the charsmap
        steps += [normalizers.Replace(Regex(" {2,}"), " "),
                  normalizers.Replace(Regex("^ +| +$"), "")]
    tok.normalizer = normalizers.Sequence(steps)
    # split=False: the lattice spans the whole sentence, as in SentencePiece
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE, prepend_scheme="always" if norm.add_dummy_prefix else "never",
        split=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def sentencepiece_decoder(vocab: dict[str, int], specials: list[str]) -> HFTokenizer:
    """The target side over the model's vocabulary (decoding only): drop special tokens, join
    the pieces, turn ▁ into spaces and strip the ends, which is what Marian's decode does."""
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in specials if t in vocab])
    ends = r"^[\s\x1c-\x1f]+|[\s\x1c-\x1f]+$"  # what Python's str.strip() removes
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.Fuse(),
                                     decoders.Replace(Regex(ends), "")])
    return tok
