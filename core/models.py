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


Route = tuple[str, ...]  # the models a line goes through, in order: one, or two with a pivot
PIVOT = "en"  # the language most models translate into and out of


def direct(found: list[Installed], source: str, target: str) -> str | None:
    """The path of the first model of `found` from `source` into `target`."""
    return next((str(m.path) for m in found if language(m.source) == source
                 and language(m.target) == target), None)


def installed_route(found: list[Installed], pairs: list[tuple[str, str]]) -> Route | None:
    """The installed models for every pair of `pairs`, or None if one is missing."""
    paths = [direct(found, *pair) for pair in pairs]
    return tuple(paths) if all(paths) else None


def legs(source: str, target: str, via: str | None) -> list[list[tuple[str, str]]]:
    """The language pairs to try, best first: the pair itself (unless a pivot is forced), then
    source -> via -> target (via: default English)."""
    pivot = language(via or PIVOT)
    tries = [] if via and pivot not in (source, target) else [[(source, target)]]
    if pivot not in (source, target):
        tries.append([(source, pivot), (pivot, target)])
    return tries


def pick(model: str | None, source: str | None = None, target: str | None = None, *,
         via: str | None = None, found: list[Installed] | None = None,
         say=lambda note: None) -> Route:
    """The models to load for -m, -f/--from, -t/--to and --via: -m wins; else the installed
    model for the languages given (embedded first). With both languages and no installed model
    for the pair: two installed ones through `via` (default English); then Helsinki-NLP's
    opus-mt models on the Hugging Face Hub, the pair's own first, then through `via` (a leg
    installed or from the Hub), `say(note)` telling what will be downloaded. () means the
    default model. A ModelNotFound lists what is installed."""
    if model is not None:
        return (model,)
    if source is None and target is None:
        return ()
    found = installed() if found is None else found
    if source is not None and target is not None:
        return chain(found, language(source), language(target), via, say)
    fits = [m for m in found
            if (source is None or language(m.source) == language(source))
            and (target is None or language(m.target) == language(target))]
    if not fits:
        side = f"from {language(source)}" if source else f"into {language(target)}"
        raise ModelNotFound(f"no installed model translates {side}; installed: {listing(found)} "
                            "(with both --from and --to, one may be fetched from the Hub)")
    if len({language(m.source) for m in fits}) > 1 or len({language(m.target) for m in fits}) > 1:
        raise UsageError(f"several models fit ({listing(fits)}); give both --from and --to")
    return (str(fits[0].path),)


def chain(found: list[Installed], source: str, target: str, via: str | None, say) -> Route:
    """See pick: installed models first, then the Hub."""
    if source == target:
        raise UsageError(f"--from and --to are both {source}")
    tries = legs(source, target, via)
    for pairs in tries:
        route = installed_route(found, pairs)
        if route:
            return announce(route, pairs, say)
    answers: dict[str, bool | None] = {}
    for pairs in tries:
        route, fetched = [], []
        for pair in pairs:
            path = direct(found, *pair)
            if path is None:
                repo = hub.OPUS_MT.format(*pair)
                if repo not in answers:
                    answers[repo] = hub.available(repo)
                path = repo if answers[repo] else None
                fetched.append((pair, repo))
            route.append(path)
        if all(route):
            for (a, b), repo in fetched:
                say(f"no installed model translates {a} to {b}; fetching {repo} from the "
                    "Hugging Face Hub (converted once into the cache)")
            return announce(tuple(route), pairs, say)
    names = " nor ".join(" then ".join(f"{a} to {b}" for a, b in pairs) for pairs in tries)
    unknown = [repo for repo, answer in answers.items() if answer is None]
    hub_note = (f"; could not ask the Hub for {', '.join(unknown)} ({hub.offline_reason()})"
                if unknown else "; the Hub has no opus-mt model for them either")
    raise ModelNotFound(f"no installed model translates {names}{hub_note}; installed: "
                        f"{listing(found)}")


def announce(route: Route, pairs: list[tuple[str, str]], say) -> Route:
    if len(route) > 1:
        say(f"translating {pairs[0][0]} to {pairs[-1][1]} through {pairs[0][1]}: "
            + ", then ".join(route))
    return route


def routes(found: list[Installed], target: str | None = None,
           via: str | None = None) -> dict[str, Route]:
    """Source language -> the installed models a line in it goes through: the first model of
    `found` from it (into `target` if given); with `target`, two through `via` (default
    English) for a language without a direct model, or for every language when `via` is
    given."""
    table: dict[str, Route] = {}
    if target is None:
        for m in found:
            table.setdefault(language(m.source), (str(m.path),))
        return table
    for s in dict.fromkeys(language(m.source) for m in found):
        if s == language(target):
            continue
        for pairs in legs(s, language(target), via):
            route = installed_route(found, pairs)
            if route:
                table[s] = route
                break
    return table


def languages(found: list[Installed]) -> list[str]:
    """Every language a model of `found` reads or writes."""
    return sorted({language(x) for m in found for x in (m.source, m.target)} - {"?"})
