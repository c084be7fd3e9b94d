"""ModelConfig: every hyper-parameter that fixes the shape and behaviour of a model."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import ModelError

ACTIVATIONS = ("relu", "gelu", "swish")
POSITIONALS = ("sinusoidal", "learned")
SINUSOID_LAYOUTS = ("interleaved", "halves")
# A model whose parameters would not fit a workstation is a broken config, not a request.
MAX_PARAMETERS = 2_000_000_000


@dataclass
class ModelConfig:
    vocab_size: int  # shared source/target vocabulary (one embedding matrix)
    d_model: int = 512  # width of every residual stream
    n_heads: int = 8  # attention heads; d_model must divide evenly
    d_ff: int = 2048  # inner width of the position-wise feed-forward network
    n_encoder_layers: int = 6  # N on the encoder side
    n_decoder_layers: int = 6  # N on the decoder side
    dropout: float = 0.1  # on embeddings and on every sub-layer output before the residual add
    attention_dropout: float = 0.0  # on attention weights
    activation_dropout: float = 0.0  # inside the feed-forward network, after the activation
    activation: str = "relu"  # relu | gelu | swish
    norm_first: bool = False  # False: post-norm as in the paper; True: pre-norm (+ final norms)
    layer_norm_eps: float = 1e-5
    positional: str = "sinusoidal"  # sinusoidal | learned
    sinusoid_layout: str = "interleaved"  # interleaved sin/cos (paper) | halves (Marian: sin then cos)
    max_positions: int = 512  # longest sequence the positional encoding covers, each side
    scale_embeddings: bool = True  # multiply token embeddings by sqrt(d_model)
    tie_output: bool = True  # the output projection reuses the embedding matrix
    final_logits_bias: bool = False  # a learned bias added to the logits (Marian has one)
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3
    decoder_start_id: int = 2  # first decoder input: BOS for our models, pad for Marian
    source_lang: str = ""  # informative, e.g. "en"
    target_lang: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, why: str) -> None:
            if not ok:
                raise ModelError(f"invalid model config: {why}")

        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_encoder_layers",
                     "n_decoder_layers", "max_positions"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
        need(self.d_model % self.n_heads == 0,
             f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.positional == "sinusoidal":
            need(self.d_model % 2 == 0, "sinusoidal positions need an even d_model")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}")
        need(self.positional in POSITIONALS, f"positional must be one of {POSITIONALS}")
        need(self.sinusoid_layout in SINUSOID_LAYOUTS,
             f"sinusoid_layout must be one of {SINUSOID_LAYOUTS}")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1)")
        for name in ("pad_id", "unk_id", "bos_id", "eos_id", "decoder_start_id"):
            value = getattr(self, name)
            need(isinstance(value, int) and 0 <= value < self.vocab_size,
                 f"{name}={value!r} is outside the vocabulary (size {self.vocab_size})")
        need(self.parameter_estimate() <= MAX_PARAMETERS,
             f"about {self.parameter_estimate():,} parameters is more than this tool loads "
             f"({MAX_PARAMETERS:,}); check vocab_size, d_model, d_ff and the layer counts")

    def parameter_estimate(self) -> int:
        """Rough parameter count, computed before anything is allocated."""
        d, f = self.d_model, self.d_ff
        encoder = self.n_encoder_layers * (4 * d * d + 2 * d * f)
        decoder = self.n_decoder_layers * (8 * d * d + 2 * d * f)
        output = 0 if self.tie_output else self.vocab_size * d
        return self.vocab_size * d + encoder + decoder + output

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ModelError(f"invalid model config: unknown field(s) {', '.join(unknown)}")
        if "vocab_size" not in data:
            raise ModelError("invalid model config: missing field vocab_size")
        return cls(**data)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(f"{path} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ModelError(f"{path} must hold a JSON object")
        return cls.from_dict(data)
