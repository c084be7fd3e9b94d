"""Build the benchmark's model once into benchmarks/.work/: an opus-mt-en-de-shaped Marian
model with random weights (only speed is measured, so no download and no trained weights are
needed), then our checkpoint and a CTranslate2 model converted from that same directory.

Each stage is written into a temporary directory and renamed when complete, so an existing
directory is a finished stage and an interrupted build starts that stage again.

    python -m benchmarks.model    # builds what is missing; progress on stderr
"""

from __future__ import annotations

import io
import json
import random
import shutil
import sys
from pathlib import Path

from benchmarks.workloads import CT2, EOS, MARIAN, OURS, PAD, UNK, VOCAB_SIZE, WORK

SPM_VOCAB = 1000  # small SentencePiece model; the rest of the 58,101 ids are filler pieces


def log(message: str) -> None:
    print(f"[model] {message}", file=sys.stderr, flush=True)


def english_like(n: int, seed: int = 0) -> list[str]:
    """Deterministic text with English-looking words, enough for a 1,000-piece model."""
    rng = random.Random(seed)
    common = ["the", "a", "an", "of", "to", "in", "on", "at", "with", "and", "for", "is",
              "are", "was", "has", "this", "that", "man", "woman", "child", "dog", "street",
              "water", "people", "two", "red", "blue", "small", "large", "riding", "walking",
              "playing", "sitting", "standing", "looking", "holding", "wearing"]
    onsets = ["b", "bl", "br", "c", "ch", "cl", "cr", "d", "dr", "f", "fl", "fr", "g", "gl",
              "gr", "h", "j", "k", "l", "m", "n", "p", "pl", "pr", "qu", "r", "s", "sh", "sk",
              "sl", "sm", "sn", "sp", "st", "str", "sw", "t", "th", "tr", "v", "w", "wh", "y"]
    vowels = ["a", "e", "i", "o", "u", "ea", "ee", "oo", "ou", "ai", "ie", "oa"]
    codas = ["", "", "n", "r", "s", "t", "d", "ng", "nd", "st", "ck", "ll", "rt", "th", "m"]
    made = ["".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                    for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    sentences = []
    for _ in range(n):
        words = [rng.choice(common) if rng.random() < 0.4 else rng.choice(made)
                 for _ in range(rng.randint(4, 18))]
        words[0] = words[0].capitalize()
        sentences.append(" ".join(words) + rng.choice([".", ".", ".", "?", "!"]))
    return sentences


def train_spm(texts: list[str]) -> bytes:
    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=out, vocab_size=SPM_VOCAB,
        model_type="unigram", character_coverage=1.0, normalization_rule_name="nmt_nfkc",
        minloglevel=2)
    return out.getvalue()


def write_tokenizer(path: Path) -> None:
    """source.spm, target.spm (one model for both sides), vocab.json with opus-mt's 58,101
    ids, and tokenizer_config.json."""
    import sentencepiece

    spm = train_spm(english_like(20000))
    (path / "source.spm").write_bytes(spm)
    (path / "target.spm").write_bytes(spm)
    proc = sentencepiece.SentencePieceProcessor(model_proto=spm)
    vocab = {"</s>": EOS, "<unk>": UNK}
    # the ordinary pieces; the model's own control and unknown pieces are vocab.json's above
    for i in range(proc.get_piece_size()):
        if not (proc.is_control(i) or proc.is_unknown(i)):
            vocab.setdefault(proc.id_to_piece(i), len(vocab))
    # filler pieces: the pieces are letters only, so names with digits cannot collide
    filler = 0
    while len(vocab) < PAD:
        vocab.setdefault(f"▁tok{filler}", len(vocab))
        filler += 1
    vocab["<pad>"] = PAD
    assert len(vocab) == VOCAB_SIZE and sorted(vocab.values()) == list(range(VOCAB_SIZE))
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "source_lang": "en", "target_lang": "de", "model_max_length": 512,
        "separate_vocabs": False, "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "tokenizer_class": "MarianTokenizer"}, indent=2))


def build_marian(path: Path) -> None:
    import torch
    import transformers

    config = transformers.MarianConfig(
        vocab_size=VOCAB_SIZE, d_model=512, encoder_layers=6, decoder_layers=6,
        encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
        decoder_ffn_dim=2048, activation_function="swish", max_position_embeddings=512,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, scale_embedding=True,
        share_encoder_decoder_embeddings=True, forced_eos_token_id=None,
        # not a MarianConfig field (Marian positions are always sinusoids); kept because
        # opus-mt's config.json has it
        static_position_embeddings=True)
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():
        # CTranslate2 starts the decoder from a zero vector where transformers and we embed
        # <pad>: a zero <pad> row makes all three compute the same function
        model.get_input_embeddings().weight[PAD].zero_()
    # only the benchmark's explicit arguments decide decoding: no beams, no forced or banned
    # tokens, no length limits from the model
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=PAD, eos_token_id=EOS, pad_token_id=PAD, num_beams=1)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path)
    transformers.MarianTokenizer.from_pretrained(path)  # the directory must be complete


def build_ours(src: Path, dest: Path) -> None:
    from core import marian

    marian.convert(src, dest)


def build_ct2(src: Path, dest: Path) -> None:
    import ctranslate2

    # float32 on disk; int8 is chosen when loading (compute_type="int8_float32")
    ctranslate2.converters.TransformersConverter(str(src)).convert(
        str(dest), quantization="float32", force=True)


def stage(name: str, dest: Path, make) -> bool:
    """Run `make(tmp)` unless `dest` exists; True when it built something."""
    if dest.is_dir():
        log(f"{name}: {dest} exists, skipped")
        return False
    log(f"{name}: building {dest} ...")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if name != "ct2":  # the converter refuses an existing directory unless forced
        tmp.mkdir(parents=True)
    make(tmp)
    tmp.rename(dest)
    log(f"{name}: done")
    return True


def build() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    if stage("marian", MARIAN, build_marian):
        # a new source model makes the conversions stale
        shutil.rmtree(OURS, ignore_errors=True)
        shutil.rmtree(CT2, ignore_errors=True)
    stage("ours", OURS, lambda tmp: build_ours(MARIAN, tmp))
    stage("ct2", CT2, lambda tmp: build_ct2(MARIAN, tmp))


if __name__ == "__main__":
    build()
