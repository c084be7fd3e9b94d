"""Pivoting: two models in a chain (fr -> en -> de) when no model for the pair is there, picked
from what is installed or from Helsinki-NLP's opus-mt models on the Hub (an offline Hugging Face
cache here, with tiny Marian models built in the tests)."""

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from typer.testing import CliRunner  # noqa: E402

from cli.main import app  # noqa: E402
from conftest import marian_model  # noqa: E402
from core import hub, models  # noqa: E402
from core.errors import ModelNotFound, UsageError  # noqa: E402
from core.translator import Translator  # noqa: E402

FRENCH = [
    "Un homme fait du vélo dans la rue.", "Deux chiens jouent dans la neige profonde.",
    "Où est la gare, s'il vous plaît ?", "Les enfants rient dans le parc ce matin.",
    "Je voudrais une tasse de café avec du lait.", "Elle lit un livre chaque soir.",
]
ENGLISH = [
    "A man is riding a bicycle in the street.", "Two dogs are playing in the deep snow.",
    "Where is the train station, please?", "The children are laughing in the park.",
    "I would like a cup of coffee with milk.", "She reads a book every evening.",
]
GERMAN = [
    "Ein Mann fährt Fahrrad auf der Straße.", "Zwei Hunde spielen im tiefen Schnee.",
    "Wo ist bitte der Bahnhof?", "Die Kinder lachen heute Morgen im Park.",
    "Ich hätte gern eine Tasse Kaffee mit Milch.", "Sie liest jeden Abend ein Buch.",
]
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input, prog_name="translate")


@pytest.fixture(scope="module")
def opus(tmp_path_factory) -> dict[str, Path]:
    """Two tiny opus-mt models, fr->en and en->de, in Hugging Face layout."""
    root = tmp_path_factory.mktemp("opus")
    return {"fr-en": marian_model(root / "opus-mt-fr-en", FRENCH, ENGLISH, seed=1,
                                      eos_bias=0.0),
            "en-de": marian_model(root / "opus-mt-en-de", ENGLISH, GERMAN, seed=2,
                                      eos_bias=0.0)}


@pytest.fixture
def hub_cache(tmp_path, opus, monkeypatch):
    """No embedded model; an offline Hugging Face cache holding Helsinki-NLP/opus-mt-fr-en and
    opus-mt-en-de; an empty cache of converted models."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    for pair, path in opus.items():
        repo = cache / f"models--{hub.OPUS_MT.format(*pair.split('-')).replace('/', '--')}"
        shutil.copytree(path, repo / "snapshots" / COMMIT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
    (tmp_path / "embedded").mkdir()
    monkeypatch.setattr(models, "checkpoints_dir", lambda: tmp_path / "embedded")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TRANSLATE_CACHE", str(tmp_path / "converted"))
    return cache


def by_hand(opus, lines: list[str], **options) -> tuple[list[str], list[list]]:
    """The pivot texts, and the n-best of their translations, from the two models run one
    after the other through the Python API, each with its own decoding defaults."""
    first = Translator.load(str(opus["fr-en"]), device="cpu")
    second = Translator.load(str(opus["en-de"]), device="cpu")
    pivots = first.translate_nbest(lines, **{**options, "n_best": 1})
    return pivots, second.translate_nbest([p[0].text for p in pivots], **options)


def test_from_to_pivots_through_english_from_the_hub(hub_cache, opus):
    result = run("--from", "fr", "--to", "de", input="\n".join(FRENCH[:4]) + "\n")
    assert result.exit_code == 0, result.stderr
    pivots, nbests = by_hand(opus, FRENCH[:4])
    assert result.stdout == "".join(nbest[0].text + "\n" for nbest in nbests)
    assert pivots[0][0].text != nbests[0][0].text  # two different models took part
    for pair in ("fr-en", "en-de"):  # what is fetched is said, on stderr
        assert (f"note: no installed model translates {pair.replace('-', ' to ')}; fetching "
                f"Helsinki-NLP/opus-mt-{pair} from the Hugging Face Hub") in result.stderr
    assert ("note: translating fr to de through en: Helsinki-NLP/opus-mt-fr-en, then "
            "Helsinki-NLP/opus-mt-en-de") in result.stderr
    again = run("--from", "fr", "--to", "de", input="\n".join(FRENCH[:4]) + "\n")
    assert again.stdout == result.stdout  # now from the converted copies in the cache
    assert "fetching" not in again.stderr and "through en" in again.stderr


def test_pivot_nbest_scores_and_text_in_jsonl(hub_cache, opus):
    result = run("-f", "fr", "-t", "de", "-b", "3", "--n-best", "2", "--format", "jsonl",
                 input="\n".join(FRENCH[:3]) + "\n")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    pivots, nbests = by_hand(opus, FRENCH[:3], beam_size=3, n_best=2)
    for record, pivot, nbest in zip(records, pivots, nbests):
        assert record["pivot"] == pivot[0].text  # the English the second model translated
        assert [c["text"] for c in record["nbest"]] == [c.text for c in nbest]
        for got, candidate in zip(record["nbest"], nbest):  # both models' scores, summed
            assert got["score"] == pytest.approx(pivot[0].score + candidate.score, abs=1e-3)


def test_detected_lines_take_their_route_into_the_target(hub_cache, opus):
    """--to de without --from: French lines through English, English ones straight to German,
    German ones passed through; one line out per line in."""
    assert run("download", "Helsinki-NLP/opus-mt-fr-en").exit_code == 0
    assert run("download", "Helsinki-NLP/opus-mt-en-de").exit_code == 0
    lines = [FRENCH[1], ENGLISH[1], GERMAN[1], "", FRENCH[4]]
    result = run("--to", "de", "--format", "jsonl", input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len(lines)
    pivots, nbests = by_hand(opus, [FRENCH[1], FRENCH[4]])
    second = Translator.load(str(opus["en-de"]), device="cpu")
    assert [r["translation"] for r in records] == [
        nbests[0][0].text, second.translate([ENGLISH[1]])[0], GERMAN[1], "", nbests[1][0].text]
    assert [r.get("pivot") for r in records] == [pivots[0][0].text, None, None, None,
                                                 pivots[1][0].text]
    assert records[2]["warnings"] == ["already in de: passed through"]


def test_eval_scores_a_pivot(hub_cache, opus, tmp_path):
    (tmp_path / "src.fr").write_text("\n".join(FRENCH) + "\n", encoding="utf-8")
    (tmp_path / "ref.de").write_text("\n".join(GERMAN) + "\n", encoding="utf-8")
    result = run("eval", "--src", tmp_path / "src.fr", "--ref", tmp_path / "ref.de", "-f", "fr",
                 "-t", "de", "-o", tmp_path / "hyp.de")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("BLEU ")
    _, nbests = by_hand(opus, FRENCH)
    assert (tmp_path / "hyp.de").read_text(encoding="utf-8") == "".join(
        n[0].text + "\n" for n in nbests)


def installed(*pairs: str) -> list[models.Installed]:
    return [models.Installed(pair, Path(f"/m/{pair}"), *pair.split("-"), 1.0, "float32",
                             "embedded", {}) for pair in pairs]


def test_the_choice_of_models():
    found = installed("fr-en", "en-de", "fr-de", "de-en", "es-en")
    assert models.pick(None, "fr", "de", found=found) == ("/m/fr-de",)  # direct first
    assert models.pick(None, "fra", "deu", via="en", found=found) == ("/m/fr-en", "/m/en-de")
    assert models.pick(None, "es", "de", found=found) == ("/m/es-en", "/m/en-de")
    assert models.pick(None, "en", "de", via="en", found=found) == ("/m/en-de",)  # nothing to chain
    with pytest.raises(UsageError, match="both de"):
        models.pick(None, "de", "de", found=found)
    assert models.routes(found, "de") == {"fr": ("/m/fr-de",), "en": ("/m/en-de",),
                                          "es": ("/m/es-en", "/m/en-de")}
    assert models.routes(found, "de", via="en")["fr"] == ("/m/fr-en", "/m/en-de")
    assert models.routes(found)["fr"] == ("/m/fr-en",)  # no target: the first model from fr


def test_a_hub_without_the_models_says_so(monkeypatch):
    monkeypatch.setattr(hub, "available", lambda repo: False)
    with pytest.raises(ModelNotFound, match="the Hub has no opus-mt model for them either; "
                                            r"installed: en-de \(en->de\)$"):
        models.pick(None, "fr", "de", found=installed("en-de"))
    asked = []
    monkeypatch.setattr(hub, "available", lambda repo: asked.append(repo) or repo.endswith("fr-en"))
    notes = []
    route = models.pick(None, "fr", "de", found=installed("en-de"), say=notes.append)
    assert route == ("Helsinki-NLP/opus-mt-fr-en", "/m/en-de")
    assert asked == ["Helsinki-NLP/opus-mt-fr-de", "Helsinki-NLP/opus-mt-fr-en"]
    assert notes[0].startswith("no installed model translates fr to en; fetching Helsinki-NLP/")


@pytest.mark.parametrize("flags", [["--via", "en", "Bonjour"], ["-m", "x", "--via", "en", "-t",
                                                                  "de", "Bonjour"]])
def test_via_needs_to_and_no_model(flags):
    result = run(*flags)
    assert result.exit_code == 2 and result.stderr.startswith("error: --via")
