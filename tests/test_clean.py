"""Training data: cleaning filters, evaluation sets kept out, copy-through augmentation, corpora
read in either direction, and a run warm-started from a checkpoint."""

import random
import re

import pytest
from safetensors.torch import load_file

from core import augment, checkpoint, clean, data
from core.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def language():
    return clean.LanguageCheck()


def test_each_filter_drops_what_it_names(language):
    pairs = [
        ("The dog runs.", "Der Hund rennt."),
        ("The dog  runs. ", "Der Hund rennt."),  # the same pair after tidying
        ("", "Leer."),
        ("Room 12 is free.", "Zimmer 13 ist frei."),
        ("Yes.", "Ja, das ist ein sehr langer Satz, der nicht zur Quelle passt, überhaupt nicht."),
        ("This sentence was never translated at all.", "This sentence was never translated at all."),
        ("The weather is lovely in the mountains today.",
         "The weather is lovely in the hills today, said he."),
        ("Hello, world!", "Hallo Welt!"),
        ("It costs 1,000.50 euros.", "Es kostet 1.000,50 Euro."),
    ]
    kept, dropped = clean.clean(pairs, "en", "de", exclude={clean.key("hello world")},
                                language=language)
    assert kept == [("The dog runs.", "Der Hund rennt."),
                    ("It costs 1,000.50 euros.", "Es kostet 1.000,50 Euro.")]
    assert dropped == {"duplicate": 1, "empty": 1, "digits": 1, "ratio": 1, "copy": 1,
                       "language": 1, "evaluation": 1}


def test_short_sentences_are_never_judged_by_language(language):
    assert not language.wrong("Hug me.", "en")  # py3langid calls it German
    assert language.wrong("Das ist ein ganz normaler deutscher Satz über das Wetter.", "en")
    assert not language.wrong("Das ist ein ganz normaler deutscher Satz über das Wetter.", "de")


def test_evaluation_sentences_match_across_case_and_punctuation():
    keys = clean.exclusion_keys([[("A man is riding a bicycle.", "Ein Mann fährt Fahrrad.")]])
    pairs = [("a man is riding a bicycle", "irgendwas"), ("x y", "EIN MANN FÄHRT FAHRRAD!"),
             ("A man is riding a horse.", "Ein Mann reitet.")]
    kept, dropped = clean.clean(pairs, "en", "de", exclude=keys)
    assert kept == [pairs[2]] and dropped == {"evaluation": 2}


def test_duplicates_are_dropped_across_corpora():
    seen = set()
    first, _ = clean.clean([("a b", "c d")], "en", "de", seen=seen)
    second, dropped = clean.clean([("a b", "c d"), ("e", "f")], "en", "de", seen=seen)
    assert first == [("a b", "c d")] and second == [("e", "f")] and dropped == {"duplicate": 1}


def test_augmented_pairs_carry_the_same_span_on_both_sides():
    base = [("Tom bought 3 apples.", "Tom kaufte 3 Äpfel."),
            ("I saw Mary in Paris.", "Ich sah Mary in Paris."),
            ("The dog sleeps.", "Der Hund schläft.")]
    pairs = augment.augment(base, 400, seed=5)
    assert len(pairs) == 400 and pairs == augment.augment(base, 400, seed=5)
    for src, tgt in pairs:
        assert clean.digits(src) == clean.digits(tgt)  # never an unbalanced number
    # every kind of span appears, copied verbatim into the target
    rng = random.Random(0)
    for make in augment.SPANS:
        span = make(rng)
        assert span and span == span.strip()
    texts = " ".join(s for s, _ in pairs)
    assert re.search(r"https?://", texts) and "@" in texts and re.search(r"\d+:\d\d", texts)
    assert any(s.isupper() for s, _ in pairs)  # capitals too
    replaced = [s for s, _ in pairs if s.startswith("I saw ") and "Mary" not in s]
    assert replaced, "a name the two sides share is replaced by a generated one"


def test_tsv_columns_read_in_either_direction(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("Hello.\tHallo.\n", encoding="utf-8")
    assert data.read_corpus(str(path), "en", "de", ("en", "de")) == [("Hello.", "Hallo.")]
    assert data.read_corpus(str(path), "de", "en", ("en", "de")) == [("Hallo.", "Hello.")]


def test_three_letter_suffixes_are_found(tmp_path):
    (tmp_path / "news.eng").write_text("Hello.\n")
    (tmp_path / "news.deu").write_text("Hallo.\n")
    assert data.read_corpus(str(tmp_path / "news"), "de", "en") == [("Hallo.", "Hello.")]


def test_warm_start_takes_shape_tokenizer_and_weights(model_dir, tmp_path):
    """init = a checkpoint: the run starts from its weights (not the seed's), with its
    tokenizer, in the run's own direction."""
    corpus = tmp_path / "pairs.tsv"
    corpus.write_text("a b\tc d\ne f\tg h\n", encoding="utf-8")
    cfg = TrainConfig(train=[{"path": str(corpus), "repeat": 3}], out=str(tmp_path / "run"),
                      init=str(model_dir), src_lang="de", tgt_lang="en", tsv_languages=["en", "de"],
                      clean=True, augment=0.5, epochs=1, lr=1e-9, warmup=1, threads=1,
                      max_tokens=64)
    trainer = Trainer(cfg)
    trainer.load_data()
    assert len(trainer.examples) == 2 * 3 + 1  # repeated, plus one copy-through pair
    trainer.build()
    assert trainer.model_config.d_model == 32 and trainer.model_config.source_lang == "de"
    start = load_file(str(model_dir / checkpoint.WEIGHTS))
    for name, tensor in trainer.model.state_dict().items():
        if name in start:
            assert (tensor == start[name]).all(), name
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == \
        (model_dir / "tokenizer.json").read_bytes()
