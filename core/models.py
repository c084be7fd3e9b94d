"""The one resolver: what `-m` names (an embedded model, a checkpoint directory, a Marian
directory in Hugging Face layout, a Hugging Face Hub id) becomes a checkpoint directory, read
by core.checkpoint.

    -m NAME  ->  models.load  ->  models.resolve: embedded name? path? Marian dir (hub.local ->
                                  marian.convert)? Hub id (hub.resolve -> hub.fetch ->
                                  marian.convert)?  ->  checkpoint.load(directory)

Imports point down: models -> hub -> marian -> checkpoint -> model."""

from __future__ import annotations

import difflib
from pathlib import Path

import checkpoints
from core import checkpoint, hub, marian
from core.checkpoint import CONFIG, Checkpoint
from core.errors import ModelError, ModelNotFound, UsageError

DEFAULT_MODEL = "en-de"


def checkpoints_dir() -> Path:
    """The embedded models: `checkpoints/` in the source tree or in the installed wheel."""
    return Path(checkpoints.__file__).parent


def available_models() -> list[Path]:
    root = checkpoints_dir()
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / CONFIG).is_file())


def resolve(name_or_path: str | None, revision: str | None = None) -> Path:
    """The checkpoint directory for -m: a directory path, the name of an embedded model
    (default: en-de), or a Hugging Face Hub id OWNER/NAME at `revision` (default main).

    An existing path always wins over a Hub id. A directory in Hugging Face Marian layout, and
    a Hub model, are converted once into the cache and that copy is returned."""
    name = name_or_path or DEFAULT_MODEL
    path = Path(name).expanduser()
    if revision is not None and (path.exists() or not hub.is_hub_id(name)):
        raise UsageError(f"--revision applies to Hugging Face Hub ids (OWNER/NAME), not '{name}'")
    if path.is_dir():
        kind = marian.hf_model_type(path)
        if kind is None:
            return path
        if kind != "marian":
            raise ModelError(f"{path} holds a Hugging Face '{kind}' model; only Marian models "
                             "(model_type marian) can be imported")
        return hub.local(path)
    embedded = checkpoints_dir() / name
    if "/" not in name and (embedded / CONFIG).is_file():
        return embedded
    if not path.exists() and hub.is_hub_id(name):
        try:
            return hub.resolve(name, revision)
        except ModelNotFound as exc:  # it may have been meant as a path
            raise ModelNotFound(f"no model directory '{name}' here, and {exc}") from None
    if name_or_path is None:
        raise ModelNotFound(f"the default model '{DEFAULT_MODEL}' is not installed in "
                            f"{checkpoints_dir()}; pass -m DIR with a checkpoint directory")
    if path.exists():
        raise ModelNotFound(f"{name} is a file, not a model directory")
    known = [p.name for p in available_models()]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else (
        f"; known models: {', '.join(known)}" if known else "")
    raise ModelNotFound(f"no model directory or embedded model named '{name}'{hint}")


def load(name_or_path: str | None = None, device: str = "auto", *,
         revision: str | None = None, dtype: str = "float32") -> Checkpoint:
    """Resolve `-m` (see resolve) and read the model for inference in `dtype`."""
    return checkpoint.load(resolve(name_or_path, revision), device, dtype=dtype)
