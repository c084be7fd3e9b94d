"""Which language is a line in? py3langid (naive Bayes over byte n-grams, 97 languages, no
pickle), restricted to the languages that matter for routing.

Measured on 8,000 short sentences (Tatoeba test en/de, Multi30k fr/cs): py3langid 99.4%
right (97.3% on lines of four words or fewer), lingua-language-detector 98.7% (94.7%) in its
high-accuracy mode, which takes 3.6 s to load, or 91.9% (74.0%) in its fast mode. py3langid's
own loading decompresses a 68 MB table (0.7 s); the decompressed table is kept in the user
cache, cut to the languages asked for and memory-mapped, so a later start reads only what the
lines it judges touch."""

from __future__ import annotations

import shutil
from pathlib import Path

from core.userdir import written_whole

MIN_CONFIDENCE = 0.9  # below this a line keeps the default route
MIN_LETTERS = 8  # shorter lines are not judged: "OK", "Tom!" are anyone's


def _decompressed(cache: Path) -> Path:
    """py3langid's model, decompressed once into the cache (same content, faster to open)."""
    import lzma

    from py3langid import __version__
    from py3langid.langid import MODEL_DIR, MODEL_FILE

    path = cache / f"py3langid-{__version__}.npz"
    if not path.is_file():
        with written_whole(path) as out, lzma.open(MODEL_DIR / MODEL_FILE) as src:
            while block := src.read(1 << 20):
                out.write(block)
    return path


def _restricted(cache: Path, languages: list[str]) -> Path:
    """The model cut to `languages` (the table's columns for them only) as uncompressed .npy
    files, which open memory-mapped: a start reads the pages a line touches, not 68 MB."""
    import numpy as np
    from py3langid import __version__

    folder = cache / f"py3langid-{__version__}" / "-".join(languages)
    if (folder / "nextmove.npy").is_file():  # written last
        return folder
    with np.load(_decompressed(cache), allow_pickle=False) as data:
        classes = data["classes"].tolist()
        keep = [i for i, c in enumerate(classes) if c in languages] or list(range(len(classes)))
        arrays = {"ptc": np.ascontiguousarray(data["ptc"][:, keep]), "pc": data["pc"][keep],
                  "classes": data["classes"][keep], "out_feat": data["out_feat"],
                  "nextmove_row": data["nextmove_row"], "nextmove": data["nextmove"]}
    for name, array in arrays.items():
        with written_whole(folder / f"{name}.npy") as out:
            np.save(out, array, allow_pickle=False)
    return folder


class Detector:
    """Language of a text among `languages` (ISO 639-1), with its probability."""

    def __init__(self, languages: list[str], cache: Path):
        import numpy as np
        from py3langid.langid import LanguageIdentifier

        folder = None
        try:
            folder = _restricted(cache, languages)
            load = lambda name: np.load(folder / f"{name}.npy", mmap_mode="r")  # noqa: E731
            nextmove = load("nextmove")
            self.identifier = LanguageIdentifier(
                load("ptc"), np.array(load("pc")), load("classes").tolist(),
                memoryview(nextmove).cast("B").cast({2: "H", 4: "I", 8: "Q"}[nextmove.itemsize]),
                load("out_feat").tolist(), norm_probs=True, tk_row=load("nextmove_row").tolist())
        except (OSError, KeyError, ValueError, AttributeError, TypeError):  # damaged, changed
            from py3langid.langid import MODEL_FILE

            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)  # built again next time
            self.identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
            known = [lang for lang in languages if lang in self.identifier.nb_classes]
            self.identifier.set_languages(known or None)

    def detect(self, text: str) -> tuple[str | None, float]:
        """(language, probability); (None, 0) for text too short to judge."""
        if sum(c.isalpha() for c in text) < MIN_LETTERS:
            return None, 0.0
        lang, p = self.identifier.classify(text)
        return lang, float(p)
