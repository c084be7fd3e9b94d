"""Checkpoint directories: config.json + model.safetensors + tokenizer.json (or
source_tokenizer.json + target_tokenizer.json when the two sides differ, as in Marian models),
and optionally generation.json, the decoding settings the model was published with.

Nothing pickled is ever read: weights are safetensors, checked against the config before any
tensor is loaded. This is the format layer: it knows nothing of where models come from (names,
the Hub, Marian directories: core.models)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from core import precision
from core.config import ModelConfig
from core.errors import DeviceError, ModelError, ModelNotFound, UsageError
from core.model import Transformer
from core.tokenizer import Tokenizer

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
SOURCE_TOKENIZER, TARGET_TOKENIZER = "source_tokenizer.json", "target_tokenizer.json"
GENERATION = "generation.json"


@dataclass
class Checkpoint:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    generation: dict = field(default_factory=dict)  # DecodeOptions fields the model suggests


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("CUDA was asked for but no CUDA device is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"unknown device '{device}'; use auto, cpu or cuda")
    return torch.device(device)


def check_tensors(model: Transformer, path: Path) -> list[str]:
    """Compare names and shapes in a safetensors file with the model built from the config."""
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path} is not a readable safetensors file ({exc})") from None
    return match_shapes(model, found, path)


def match_shapes(model: Transformer, found: dict[str, tuple], path: Path) -> list[str]:
    """Tensor names and shapes `found` in `path` must be exactly those of `model`."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    if missing:
        raise ModelError(f"{path} lacks tensor(s) {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}; it does not match {CONFIG}")
    if extra:
        raise ModelError(f"{path} has unexpected tensor(s) {', '.join(extra[:3])}; "
                         f"it does not match {CONFIG}")
    if wrong:
        n = wrong[0]
        raise ModelError(f"{path}: tensor {n} has shape {list(found[n])} but {CONFIG} implies "
                         f"{list(expected[n])}")
    return sorted(found)


def tokenizer_files(path: Path) -> list[str]:
    """tokenizer.json, or a source and a target file where the two sides differ."""
    if not (path / TOKENIZER).is_file() and (path / SOURCE_TOKENIZER).is_file():
        return [SOURCE_TOKENIZER, TARGET_TOKENIZER]
    return [TOKENIZER]


def read_generation(path: Path) -> dict:
    """generation.json: DecodeOptions fields and values, checked; {} where there is none."""
    from core.search import DecodeOptions

    file = Path(path) / GENERATION
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{file} is not valid JSON ({exc})") from None
    known = {f.name for f in dataclasses.fields(DecodeOptions)}
    if not isinstance(data, dict) or not set(data) <= known:
        raise ModelError(f"{file} must map decoding options ({', '.join(sorted(known))}) "
                         "to values")
    try:
        DecodeOptions(**data)
    except (UsageError, TypeError) as exc:
        raise ModelError(f"{file}: {exc}") from None
    return data


def load(path: str | Path, device: str = "auto", *, dtype: str = "float32") -> Checkpoint:
    """Read the checkpoint directory `path` for inference in `dtype` (see core.precision).
    Names, Marian directories and Hub ids are core.models' business."""
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFound(f"no model directory {path}")
    target = pick_device(device)
    precision.check(dtype, target)
    try:
        return read(path, target, dtype)
    except ModelError as exc:  # every problem inside a model directory has the same fix
        raise ModelError(f"{exc} (re-save or re-download the model in {path})") from None


def read(path: Path, device: torch.device, dtype: str = "float32") -> Checkpoint:
    """Check a checkpoint directory file by file, then load it; nothing pickled is read."""
    files = tokenizer_files(path)
    for file in (CONFIG, WEIGHTS, *files):
        if not (path / file).is_file():
            raise ModelError(f"{path} is not a complete model directory: {file} is missing")
    config = ModelConfig.load(path / CONFIG)
    tokenizer = Tokenizer.load(*(path / f for f in files))
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelError(f"{files[-1]} has {tokenizer.vocab_size} tokens but {CONFIG} "
                         f"vocab_size is {config.vocab_size}")
    generation = read_generation(path)
    with torch.device("meta"):  # shapes only: the weights are the stored ones, held once
        model = Transformer(config)  # its size was bounded by the config's validation
    names = check_tensors(model, path / WEIGHTS)
    with TensorFile(path / WEIGHTS) as tensors:
        model = precision.load(model, tensors.read, names, dtype, device, rows=tensors.matrix)
    return Checkpoint(model.to(device).eval(), tokenizer, config, path, generation)


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class TensorFile:
    """The float tensors of a safetensors file (already checked by check_tensors), read one at
    a time into memory of their own, as float32.

    Plain reads, not a memory map: mapped pages stay resident for as long as any tensor refers
    to the file, so converting a model (e.g. to int8) would keep the float32 weights in memory
    as well."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.file = open(path, "rb")
            size = int.from_bytes(self.file.read(8), "little")
            self.header, self.base = json.loads(self.file.read(size)), 8 + size
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path} is truncated or corrupt ({exc})") from None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def read(self, name: str, rows: slice = slice(None)) -> torch.Tensor:
        """The tensor `name`, or of a matrix the rows `rows`, as float32."""
        try:
            info = self.header[name]
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name} has dtype {info['dtype']}, not a float")
            shape = list(info["shape"])
            begin, end = info["data_offsets"]
            if rows != slice(None):
                row_bytes = (end - begin) // max(shape[0], 1)
                first, last, _ = rows.indices(shape[0])
                shape[0] = max(last - first, 0)
                begin, end = begin + first * row_bytes, begin + (first + shape[0]) * row_bytes
            data = bytearray(end - begin)
            self.file.seek(self.base + begin)
            if self.file.readinto(data) != len(data):
                raise ValueError(f"tensor {name} is cut short")
            flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            return flat.view(shape).float()  # float32 already: the bytes read, no copy
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise ModelError(f"{self.path} is truncated or corrupt ({exc})") from None

    def matrix(self, name: str) -> StoredMatrix:
        return StoredMatrix(self, name, tuple(self.header[name]["shape"]))


@dataclass
class StoredMatrix:
    """A matrix still in its file: `shape`, and row slices read on demand (as float32)."""

    file: TensorFile
    name: str
    shape: tuple[int, ...]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.file.read(self.name, rows)


def save(model: Transformer, tokenizer: Tokenizer, path: Path, *,
         dtype: torch.dtype = torch.float32, generation: dict | None = None) -> Path:
    """Write a checkpoint directory (created if needed); tied weights are stored once."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.cfg.save(path / CONFIG)
    if tokenizer.shared:
        tokenizer.save(path / TOKENIZER)
    else:
        tokenizer.save(path / SOURCE_TOKENIZER, path / TARGET_TOKENIZER)
    if generation:
        (path / GENERATION).write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    state = {n: t.detach().to("cpu", dtype).contiguous() for n, t in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS), metadata={"format": "pt"})
    return path
