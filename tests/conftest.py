"""Shared fixtures: tiny random models built here, never downloaded; everything on CPU."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from core import checkpoint
from core.config import ModelConfig
from core.model import Transformer
from core.tokenizer import Tokenizer, train_tokenizer

torch.set_num_threads(1)  # tiny models: threads only add overhead
# a suite started in the background of a non-interactive shell inherits SIGINT ignored, and so
# would every process it starts, which makes the Ctrl-C tests meaningless: a handler here is
# reset to the default in each child at exec, so the children can be interrupted again
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# nothing in the tests may reach the Hugging Face Hub; huggingface-hub reads this on import
os.environ["HF_HUB_OFFLINE"] = "1"

TEXTS = [
    "A man is riding a bicycle.", "Ein Mann fährt Fahrrad.",
    "Two dogs play in the snow.", "Zwei Hunde spielen im Schnee.",
    "The children are laughing at the park.", "Die Kinder lachen im Park.",
    "Grüße aus Köln, sagte die Frau.", "Where is the train station?",
]


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    values = dict(vocab_size=vocab_size, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2,
                  n_decoder_layers=2, dropout=0.0, max_positions=128)
    values.update(overrides)
    return ModelConfig(**values)


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(vocab_size, **overrides)).eval()
    # random weights give a flat distribution; sharpen it so EOS and ties behave like a real model
    with torch.no_grad():
        model.embed.weight.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return train_tokenizer(TEXTS * 4, vocab_size=300)


@pytest.fixture(scope="session")
def model(tokenizer) -> Transformer:
    return tiny_model(tokenizer.vocab_size)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, model, tokenizer):
    """A complete checkpoint directory, as `translate -m DIR` expects."""
    return checkpoint.save(model, tokenizer, tmp_path_factory.mktemp("tiny") / "tiny-en-de")


@pytest.fixture(scope="session", autouse=True)
def translate_cache(tmp_path_factory):
    """Converted models go to a cache of the test session's own, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("translate-cache")
        patch.setenv("TRANSLATE_CACHE", str(root))
        yield root


def train_spm(texts: list[str], **options) -> bytes:
    """A tiny SentencePiece model of `texts`, as bytes."""
    import io

    import sentencepiece

    out = io.BytesIO()
    settings = dict(vocab_size=90, model_type="unigram", character_coverage=0.995,
                    hard_vocab_limit=False, normalization_rule_name="nmt_nfkc", minloglevel=2)
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(texts * 10), model_writer=out,
                                             **(settings | options))
    return out.getvalue()


def marian_model(path, source_texts: list[str], target_texts: list[str],
                 language_tokens: tuple[str, ...] = (), *, max_length: int = 24, seed: int = 0,
                 eos_bias: float = 4.5):
    """A tiny opus-mt model in Hugging Face layout at `path`: SentencePiece models of the two
    sides over one vocabulary (with the language tokens given), and random weights. Needs
    transformers and sentencepiece (test-only)."""
    import json

    import sentencepiece
    import transformers

    path.mkdir(parents=True)
    spms = {"source.spm": train_spm(source_texts), "target.spm": train_spm(target_texts)}
    vocab = {"</s>": 0, "<unk>": 1}
    for name, data in spms.items():  # the joint vocabulary: source pieces, then target ones
        (path / name).write_bytes(data)
        proc = sentencepiece.SentencePieceProcessor(model_proto=data)
        for i in range(proc.get_piece_size()):
            if not (proc.is_control(i) or proc.is_unknown(i)):
                vocab.setdefault(proc.id_to_piece(i), len(vocab))
    for token in [*language_tokens, "<pad>"]:
        vocab[token] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    pad = vocab["<pad>"]
    config = transformers.MarianConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=pad, eos_token_id=0,
        decoder_start_token_id=pad, forced_eos_token_id=0, scale_embedding=True,
        activation_function="swish", dropout=0.0, init_std=0.2)
    torch.manual_seed(seed)
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():  # a bias that makes many sentences end early, as in real models
        model.final_logits_bias.normal_(0, 1.0)
        model.final_logits_bias[0, 0] = eos_bias
    model.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({
        "bad_words_ids": [[pad]], "decoder_start_token_id": pad, "eos_token_id": 0,
        "forced_eos_token_id": 0, "max_length": max_length + 2, "num_beams": 4,
        "pad_token_id": pad, "renormalize_logits": True}))
    return path
