"""The one resolver: what `-m` names (an embedded model, a checkpoint directory, a Marian
directory in Hugging Face layout, a Hugging Face Hub id) becomes a checkpoint directory, read
by core.checkpoint.

    -m NAME  ->  models.load  ->  models.resolve: embedded name? path? Marian dir (hub.local ->
                                  marian.convert)? Hub id (hub.resolve -> hub.fetch ->
                                  marian.convert)?  ->  checkpoint.load(directory)

Imports point down: models -> hub -> marian -> checkpoint -> model."""

from __future__ import annotations

import difflib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import checkpoints
from core import checkpoint, hub, marian
from core.checkpoint import CONFIG, Checkpoint
from core.data import ISO3
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


# ---- what is installed -------------------------------------------------------------------

@dataclass
class Installed:
    """A model `-m NAME` can load without the network."""

    name: str  # what -m takes
    path: Path
    source: str  # language codes from its config ("?" where it has none)
    target: str
    size_mb: float
    precision: str  # of the stored weights
    where: str  # embedded | hub (", --revision X" if not main) | local (a Marian directory)
    decoding: dict  # its generation.json
    default: bool = False


def installed() -> list[Installed]:
    """Embedded models first, then the converted Marian models in the cache."""
    entries = [(p.name, p, "embedded") for p in available_models()]
    for name, path, note in hub.cached_models():  # note: "  (--revision X)" or a local copy
        where = "local" if "local" in note else "hub" + note.replace("  (", ", ").rstrip(")")
        entries.append((name, path, where))
    found = []
    for name, path, where in entries:
        try:
            cfg = json.loads((path / CONFIG).read_text(encoding="utf-8"))
            decoding = checkpoint.read_generation(path)
        except (OSError, ValueError, ModelError):
            continue  # a broken directory is not a model one can use
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6
        found.append(Installed(name, path, cfg.get("source_lang") or "?",
                               cfg.get("target_lang") or "?", round(size, 1),
                               stored_precision(path / checkpoint.WEIGHTS), where, decoding,
                               default=where == "embedded" and name == DEFAULT_MODEL))
    return found


def stored_precision(weights: Path) -> str:
    """The dtype of the stored weights, from the safetensors header alone."""
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    try:
        with open(weights, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    except (OSError, ValueError):
        return "?"
    kinds = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return "/".join(sorted(names.get(k, k) for k in kinds)) or "?"


def language(code: str) -> str:
    """A language code as our configs spell it: ISO 639-1 where there is one (deu -> de)."""
    code = code.strip().lower()
    return next((two for two, three in ISO3.items() if three == code), code)


def listing(models: list[Installed]) -> str:
    return ", ".join(f"{m.name} ({m.source}->{m.target})" for m in models) or "none"


def remove(name: str) -> Path:
    """Delete a converted copy in the cache; embedded models are part of the package."""
    found = installed()
    for model in found:
        if model.name == name or str(model.path) == name:
            if model.where == "embedded":
                raise UsageError(f"{name} is embedded in the package; it cannot be removed")
            shutil.rmtree(model.path)
            return model.path
    cached = [m.name for m in found if m.where != "embedded"]
    raise ModelNotFound(f"no converted model named '{name}' in the cache"
                        + (f"; cached: {', '.join(cached)}" if cached else ""))


def pick(model: str | None, source: str | None = None, target: str | None = None, *,
         found: list[Installed] | None = None) -> str | None:
    """What to load for -m, -f/--from and -t/--to: -m wins; else the installed model (of
    `found`, default: installed()) for the languages given, embedded first; None for the
    default model. A ModelNotFound lists what is installed."""
    if model is not None or (source is None and target is None):
        return model
    found = installed() if found is None else found
    fits = [m for m in found
            if (source is None or language(m.source) == language(source))
            and (target is None or language(m.target) == language(target))]
    if not fits:
        side = (f"{language(source)} to {language(target)}" if source and target
                else f"from {language(source)}" if source else f"into {language(target)}")
        raise ModelNotFound(f"no installed model translates {side}; installed: {listing(found)}")
    if len({language(m.source) for m in fits}) > 1 or len({language(m.target) for m in fits}) > 1:
        raise UsageError(f"several models fit ({listing(fits)}); give both --from and --to")
    return str(fits[0].path)


def routes(found: list[Installed], target: str | None = None) -> dict[str, str]:
    """Source language -> the model of `found` for it (the first), into `target` if given."""
    table: dict[str, str] = {}
    for m in found:
        if target is None or language(m.target) == language(target):
            table.setdefault(language(m.source), str(m.path))
    return table


def languages(found: list[Installed]) -> list[str]:
    """Every language a model of `found` reads or writes."""
    return sorted({language(x) for m in found for x in (m.source, m.target)} - {"?"})
