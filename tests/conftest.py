"""Shared fixtures: tiny random models built here, never downloaded; everything on CPU."""

from __future__ import annotations

import os

import pytest
import torch

from core import checkpoint
from core.config import ModelConfig
from core.model import Transformer
from core.tokenizer import Tokenizer, train_tokenizer

torch.set_num_threads(1)  # tiny models: threads only add overhead
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
