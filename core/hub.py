"""Marian models from the Hugging Face Hub and from local Marian directories, converted once
into checkpoint directories in a per-user cache.

Downloads go through huggingface-hub, so its cache (HF_HOME, HF_HUB_CACHE), HF_HUB_OFFLINE and
HF_TOKEN apply; only the files a Marian model needs are fetched. The converted copies live in

    $TRANSLATE_CACHE, else $XDG_CACHE_HOME/translate, else ~/.cache/translate:
        hub/OWNER--NAME/REVISION/   per Hub id and revision as asked for (default main)
        local/NAME-HASH/            per local directory: its path and its files' sizes and times

each with origin.json saying where it came from. Later runs load a converted copy without
looking at the original files or the network; `translate download` fetches again and
re-converts when the revision has moved."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote, unquote

from core.checkpoint import CONFIG
from core.userdir import cache_root
from core.errors import ModelNotFound, UsageError

ORIGIN = "origin.json"
DEFAULT_REVISION = "main"
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
OPUS_MT = "Helsinki-NLP/opus-mt-{}-{}"  # the University of Helsinki's models, one per pair
ASK_TIMEOUT = 10  # seconds to wait for the Hub's answer to "does this model exist?"


def is_hub_id(name: str) -> bool:
    """OWNER/NAME as the Hub spells repository ids ("./x", "/x" and "a/b/c" are paths)."""
    return bool(REPO_ID.fullmatch(name)) and ".." not in name and "--" not in name


def available(repo: str) -> bool | None:
    """Whether `repo` can be had: True when the Hugging Face cache holds it or the Hub says it
    exists, False when the Hub says it does not, None when nobody can tell (offline)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return True
    if constants.HF_HUB_OFFLINE:
        return None
    try:
        HfApi().model_info(repo, timeout=ASK_TIMEOUT)
        return True
    except RepositoryNotFoundError:  # also what a gated or private one says without a token
        return False
    except Exception:  # no network, a timeout, the Hub down
        return None


def offline_reason() -> str:
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"


def hub_dir(repo: str, revision: str) -> Path:
    name = quote(revision, safe="")  # "refs/pr/1" -> "refs%2Fpr%2F1"
    if name.startswith("."):  # never "." or "..", never hidden
        name = "%2E" + name[1:]
    return cache_root() / "hub" / repo.replace("/", "--") / name


def resolve(repo: str, revision: str | None = None) -> Path:
    """The converted copy of a Hub model: from the cache, else downloaded and converted."""
    dest = hub_dir(repo, revision or DEFAULT_REVISION)
    if (dest / CONFIG).is_file():
        return dest
    return download(repo, revision)


def download(repo: str, revision: str | None = None) -> Path:
    """Fetch a Hub model (or find it in the Hugging Face cache) and convert it, unless the
    converted copy already comes from the same commit."""
    if not is_hub_id(repo):
        raise UsageError(f"'{repo}' is not a Hugging Face Hub id (OWNER/NAME)")
    revision = revision or DEFAULT_REVISION
    snapshot = fetch(repo, revision)
    commit = snapshot.name  # snapshots/<commit> in the Hugging Face cache
    dest = hub_dir(repo, revision)
    if (dest / CONFIG).is_file() and read_origin(dest).get("commit") == commit:
        return dest
    origin = {"repo": repo, "revision": revision, "commit": commit}
    return install(snapshot, dest, origin, name=repo)


def fetch(repo: str, revision: str) -> Path:
    """The snapshot folder holding the model's files, downloaded where needed. Safetensors
    weights where the repository has them, else pytorch_model.bin."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    from core.marian import FILES, PICKLE, SAFETENSORS

    try:
        folder = Path(snapshot_download(repo, revision=revision,
                                        allow_patterns=FILES + [SAFETENSORS]))
        if not (folder / SAFETENSORS).is_file():
            folder = Path(snapshot_download(repo, revision=revision,
                                            allow_patterns=FILES + [PICKLE]))
    except GatedRepoError:
        raise ModelNotFound(f"{repo} is gated or private on the Hugging Face Hub; accept its "
                            "terms there and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"there is no Hugging Face repository '{repo}' (a private one "
                            "needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"the Hugging Face repository {repo} has no revision "
                            f"'{revision}'") from None
    except LocalEntryNotFoundError:  # offline, or no network, and not (all) in the cache
        why, fix = offline_reason(), "unset it" if constants.HF_HUB_OFFLINE else "connect"
        raise ModelNotFound(f"the Hugging Face cache lacks {repo} (or part of it) and {why}; "
                            f"{fix} and run `translate download {repo}`") from None
    except Exception as exc:  # HTTP errors, a broken connection mid-download, a full disk
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFound(f"could not fetch {repo} from the Hugging Face Hub "
                            f"({reason})") from None
    return folder


def local(path: Path) -> Path:
    """The converted copy of a local Marian directory, converted now if it is new or changed."""
    from core.marian import FILES, PICKLE, SAFETENSORS

    path = Path(path).resolve()
    stamp = hashlib.sha256(str(path).encode())
    for name in sorted(FILES + [SAFETENSORS, PICKLE]):
        if (path / name).is_file():
            info = (path / name).stat()
            stamp.update(f"\0{name}\0{info.st_size}\0{info.st_mtime_ns}".encode())
    slug = re.sub(r"[^\w.-]", "_", path.name) or "model"
    dest = cache_root() / "local" / f"{slug}-{stamp.hexdigest()[:16]}"
    if (dest / CONFIG).is_file():
        return dest
    return install(path, dest, {"path": str(path)}, name=path.name)


def install(src: Path, dest: Path, origin: dict, *, name: str) -> Path:
    """Convert into a temporary directory beside `dest`, then rename it into place, so a
    reader never sees half a checkpoint; an older copy at `dest` is replaced."""
    from core import marian

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        marian.convert(src, tmp, name=name)
        (tmp / ORIGIN).write_text(json.dumps(origin, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():  # a copy of an older commit: moved aside, removed once replaced
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
        dest.rename(old / dest.name)
    try:
        tmp.rename(dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / CONFIG).is_file():
            raise
        # another process installed it first: theirs is as good as ours
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def read_origin(path: Path) -> dict:
    try:
        data = json.loads((path / ORIGIN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_models() -> list[tuple[str, Path, str]]:
    """(name for -m, directory, note) of every converted copy in the cache."""
    found = []
    for path in sorted(cache_root().glob("hub/*/*")):
        if (path / CONFIG).is_file() and not path.name.startswith("."):
            repo = path.parent.name.replace("--", "/", 1)
            revision = unquote(path.name)
            note = "" if revision == DEFAULT_REVISION else f"  (--revision {revision})"
            found.append((repo, path, note))
    for path in sorted(cache_root().glob("local/*")):
        if (path / CONFIG).is_file() and not path.name.startswith("."):
            source = read_origin(path).get("path", "?")
            found.append((source, path, "  (converted from a local Marian directory)"))
    return found
