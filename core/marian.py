"""Marian (opus-mt) models in Hugging Face layout -> our checkpoint directories.

A Marian directory holds config.json (model_type "marian"), model.safetensors or
pytorch_model.bin, source.spm and target.spm (one SentencePiece model per side), and vocab.json
(the one vocabulary both sides map their pieces into). The architecture is ours with Marian's
settings: post-norm, sinusoids in halves, sqrt(D) embedding scale, one shared embedding that is
also the output layer, swish, a final logits bias, pad as the decoder's first token.

Nothing is unpickled: weights come from safetensors, or from pytorch_model.bin through
torch.load(weights_only=True), which only rebuilds tensors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from core import checkpoint
from core.config import ModelConfig
from core.errors import ModelError
from core.model import Transformer, sinusoid_table
from core.tokenizer import (EOS, PAD, UNK, Tokenizer, read_sentencepiece, sentencepiece_decoder,
                            sentencepiece_encoder)

HF_CONFIG, SAFETENSORS, PICKLE = "config.json", "model.safetensors", "pytorch_model.bin"
SOURCE_SPM, TARGET_SPM, VOCAB = "source.spm", "target.spm", "vocab.json"
GENERATION_CONFIG, TOKENIZER_CONFIG = "generation_config.json", "tokenizer_config.json"
# what a download fetches besides the weights (the last two are optional)
FILES = [HF_CONFIG, SOURCE_SPM, TARGET_SPM, VOCAB, GENERATION_CONFIG, TOKENIZER_CONFIG]
SPECIALS = [EOS, UNK, PAD]  # Marian's tokenizer splits these out of the text and never decodes them

# MarianConfig's defaults, for keys a config.json leaves out
DEFAULTS = dict(vocab_size=58101, d_model=1024, encoder_layers=12, decoder_layers=12,
                encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
                decoder_ffn_dim=4096, max_position_embeddings=1024, activation_function="gelu",
                dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, scale_embedding=False,
                pad_token_id=58100, eos_token_id=0, decoder_start_token_id=58100,
                share_encoder_decoder_embeddings=True, tie_word_embeddings=True)
ACTIVATIONS = {"swish": "swish", "silu": "swish", "relu": "relu", "gelu": "gelu"}

EMBEDDINGS = ["model.shared.weight", "model.encoder.embed_tokens.weight",
              "model.decoder.embed_tokens.weight"]
POSITIONS = ["model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"]
LAYER = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(\w+?)\.((?:\w+\.)?(?:weight|bias))")
# per layer: Hugging Face sub-module -> ours
ENCODER = {"self_attn": "self_attn", "self_attn_layer_norm": "add_norm1.norm", "fc1": "ffn.fc1",
           "fc2": "ffn.fc2", "final_layer_norm": "add_norm2.norm"}
DECODER = {"self_attn": "self_attn", "self_attn_layer_norm": "add_norm1.norm",
           "encoder_attn": "cross_attn", "encoder_attn_layer_norm": "add_norm2.norm",
           "fc1": "ffn.fc1", "fc2": "ffn.fc2", "final_layer_norm": "add_norm3.norm"}


def hf_model_type(path: Path) -> str | None:
    """The model_type of a Hugging Face model directory; None for anything else (ours have no
    model_type, and a broken config.json is left for our own loader to report)."""
    try:
        data = json.loads((Path(path) / HF_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = data.get("model_type") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def read_json(path: Path, *, optional: bool = False) -> dict:
    if optional and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path.parent} is not a complete Marian model directory: "
                         f"{path.name} is missing") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object")
    return data


def convert(src: Path, dest: Path, *, name: str | None = None) -> Path:
    """Write our checkpoint for the Marian directory `src` into the directory `dest`; `name`
    (a Hub id or the directory's name) only serves to guess the language pair."""
    src = Path(src)
    hf = read_json(src / HF_CONFIG)
    if hf.get("model_type") != "marian":
        raise ModelError(f"{src} holds a Hugging Face '{hf.get('model_type')}' model; only "
                         "Marian models (model_type marian) can be imported")
    vocab = read_vocab(src / VOCAB)
    tok_config = read_json(src / TOKENIZER_CONFIG, optional=True)
    if tok_config.get("separate_vocabs"):
        raise ModelError(f"{src} has separate source and target vocabularies, which this "
                         "import does not support")
    config = model_config(hf, vocab, languages(name or src.resolve().name, tok_config))
    tokenizer = marian_tokenizer(src, vocab)
    if tokenizer.vocab_size > config.vocab_size or max(vocab.values()) >= config.vocab_size:
        raise ModelError(f"{src / VOCAB} has ids beyond the model's vocabulary "
                         f"({config.vocab_size})")
    state = rename(read_weights(src), config, src)
    model = Transformer(config)
    model.load_state_dict(state)
    return checkpoint.save(model, tokenizer, dest, generation=generation_defaults(src, hf))


def read_vocab(path: Path) -> dict[str, int]:
    vocab = read_json(path)
    ids = list(vocab.values())
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ModelError(f"{path} must map pieces to non-negative integer ids")
    if len(set(ids)) != len(ids):
        raise ModelError(f"{path} gives the same id to more than one piece")
    missing = [t for t in SPECIALS if t not in vocab]
    if missing:
        raise ModelError(f"{path} lacks the special token(s) {' '.join(missing)}")
    return vocab


def marian_tokenizer(src: Path, vocab: dict[str, int]) -> Tokenizer:
    """Source text through source.spm, pieces to ids through vocab.json; ids back to text
    through vocab.json with target.spm's invisible (control) pieces dropped."""
    def spm(name: str):
        try:
            data = (src / name).read_bytes()
        except FileNotFoundError:
            raise ModelError(f"{src} is not a complete Marian model directory: {name} is "
                             "missing") from None
        return read_sentencepiece(data, str(src / name))

    source, target = spm(SOURCE_SPM), spm(TARGET_SPM)
    invisible = [p.piece for p in target.pieces if p.type == p.CONTROL]
    return Tokenizer(sentencepiece_encoder(source, SPECIALS),
                     sentencepiece_decoder(vocab, SPECIALS + invisible))


def languages(name: str, tok_config: dict) -> tuple[str, str]:
    """Informative only: the tokenizer config's languages, else those in an opus-mt name."""
    source, target = tok_config.get("source_lang"), tok_config.get("target_lang")
    if isinstance(source, str) and isinstance(target, str):
        return source, target
    match = re.search(r"opus-mt-(?:tc-\w+-)?(\w+)-(\w+)$", name)
    return (match[1], match[2]) if match else ("", "")


def model_config(hf: dict, vocab: dict[str, int], langs: tuple[str, str]) -> ModelConfig:
    """Map a MarianConfig onto ours; what our model cannot express is an error."""
    def get(key):
        return hf.get(key, DEFAULTS[key])

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ModelError(f"this Marian model has {what}, which our Transformer does not "
                             "support")

    vocab_size = get("vocab_size")
    need(get("share_encoder_decoder_embeddings")
         and hf.get("decoder_vocab_size") in (None, vocab_size),
         "separate source and target embeddings")
    need(get("encoder_attention_heads") == get("decoder_attention_heads"),
         "different head counts in encoder and decoder")
    need(get("encoder_ffn_dim") == get("decoder_ffn_dim"),
         "different feed-forward widths in encoder and decoder")
    need(get("activation_function") in ACTIVATIONS,
         f"activation '{get('activation_function')}'")
    eos = get("eos_token_id")
    if isinstance(eos, list):
        need(len(eos) == 1, "several end-of-sentence tokens")
        eos = eos[0]
    pad = get("pad_token_id")
    return ModelConfig(
        vocab_size=vocab_size, d_model=get("d_model"), n_heads=get("encoder_attention_heads"),
        d_ff=get("encoder_ffn_dim"), n_encoder_layers=get("encoder_layers"),
        n_decoder_layers=get("decoder_layers"), dropout=get("dropout"),
        attention_dropout=get("attention_dropout"), activation_dropout=get("activation_dropout"),
        activation=ACTIVATIONS[get("activation_function")], norm_first=False,
        layer_norm_eps=1e-5, positional="sinusoidal", sinusoid_layout="halves",
        max_positions=get("max_position_embeddings"), scale_embeddings=bool(get("scale_embedding")),
        tie_output=bool(get("tie_word_embeddings")), final_logits_bias=True,
        # Marian has no BOS: the decoder starts from pad, and pad is never generated
        pad_id=pad, unk_id=vocab[UNK], bos_id=pad, eos_id=eos,
        decoder_start_id=get("decoder_start_token_id"), source_lang=langs[0],
        target_lang=langs[1])


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    """model.safetensors where there is one; else pytorch_model.bin, tensors only."""
    if (src / SAFETENSORS).is_file():
        try:
            return load_file(str(src / SAFETENSORS))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"{src / SAFETENSORS} is not a readable safetensors file "
                             f"({exc})") from None
    if not (src / PICKLE).is_file():
        raise ModelError(f"{src} is not a complete Marian model directory: it has neither "
                         f"{SAFETENSORS} nor {PICKLE}")
    try:
        state = torch.load(src / PICKLE, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything but tensors, or a broken file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{src / PICKLE} cannot be read as plain tensors ({reason})") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelError(f"{src / PICKLE} does not hold a dictionary of named tensors")
    return state


def rename(hf: dict[str, torch.Tensor], config: ModelConfig, src: Path) -> dict[str, torch.Tensor]:
    """Hugging Face Marian tensor names -> ours, checked against `config`."""
    hf = dict(hf)
    state: dict[str, torch.Tensor] = {}
    embeddings = [hf.pop(n) for n in EMBEDDINGS if n in hf]
    if not embeddings:
        raise ModelError(f"{src} has no token embeddings ({EMBEDDINGS[0]})")
    if any(not torch.equal(e, embeddings[0]) for e in embeddings[1:]):
        raise ModelError(f"{src} has separate encoder and decoder embeddings, which our "
                         "Transformer does not support")
    state["embed.weight"] = embeddings[0]
    head = hf.pop("lm_head.weight", None)
    if not config.tie_output:  # with tied embeddings the stored head is a copy, as in Marian
        if head is None:
            raise ModelError(f"{src} lacks lm_head.weight, which an untied model needs")
        state["lm_head.weight"] = head
    bias = hf.pop("final_logits_bias", None)
    state["logits_bias"] = (bias.reshape(-1) if bias is not None
                            else torch.zeros(config.vocab_size))  # (V,)
    for name in POSITIONS:
        if name in hf:
            check_positions(hf.pop(name), config, src)
    unknown = []
    for name, tensor in hf.items():
        match = LAYER.fullmatch(name)
        table = (ENCODER if match[1] == "encoder" else DECODER) if match else {}
        if not match or match[3] not in table:
            unknown.append(name)
            continue
        state[f"{match[1]}.{match[2]}.{table[match[3]]}.{match[4]}"] = tensor
    if unknown:
        raise ModelError(f"{src} has tensor(s) this import does not know: "
                         f"{', '.join(sorted(unknown)[:3])}{' ...' if len(unknown) > 3 else ''}")
    with torch.device("meta"):
        skeleton = Transformer(config)
    checkpoint.match_shapes(skeleton, {n: tuple(t.shape) for n, t in state.items()}, src)
    return {n: t.float().contiguous() for n, t in state.items()}


def check_positions(stored: torch.Tensor, config: ModelConfig, src: Path) -> None:
    """Older checkpoints store the position table; it must be the sinusoids we compute."""
    rows = min(stored.size(0), config.max_positions)
    table = sinusoid_table(rows, config.d_model, config.sinusoid_layout)  # (P, D)
    if stored.shape[1:] != table.shape[1:] or not torch.allclose(
            stored[:rows].float(), table, atol=1e-4):
        raise ModelError(f"{src} stores positional embeddings that are not Marian's sinusoids; "
                         "only static sinusoidal positions are supported")


def generation_defaults(src: Path, hf: dict) -> dict:
    """The model's published decoding settings, as DecodeOptions fields: its beam size, and
    its max_length less the two positions Hugging Face counts that we do not (the decoder's
    start token and EOS)."""
    gen = read_json(src / GENERATION_CONFIG, optional=True)
    beams = gen.get("num_beams", hf.get("num_beams"))
    length = gen.get("max_length", hf.get("max_length"))
    defaults: dict = {}
    if isinstance(beams, int) and not isinstance(beams, bool) and beams > 1:
        defaults.update(strategy="beam", beam_size=beams)
    if isinstance(length, int) and not isinstance(length, bool) and length > 2:
        defaults["max_length"] = length - 2
    return defaults
