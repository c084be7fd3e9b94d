"""Language detection for routing: the cached, memory-mapped table answers as py3langid does."""

from __future__ import annotations

from py3langid.langid import MODEL_FILE, LanguageIdentifier

from core.detect import Detector

LINES = ["Ein Mann fährt Fahrrad.", "Where is the train station?", "Zwei Hunde spielen im Schnee.",
         "Please send me the report by Friday.", "Bitte schicken Sie mir den Bericht bis Freitag.",
         "The European Central Bank raised interest rates again on Thursday."]


def test_the_cached_table_gives_py3langids_own_answers(tmp_path):
    reference = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    reference.set_languages(["de", "en"])
    first = Detector(["de", "en"], tmp_path)  # builds the cache
    again = Detector(["de", "en"], tmp_path)  # opens it
    for line in LINES:
        lang, p = reference.classify(line)
        for detector in (first, again):
            got, q = detector.detect(line)
            assert got == lang and abs(q - p) < 1e-5, line
    assert again.detect("OK")[0] is None  # too short to judge


def test_a_damaged_cache_falls_back_to_py3langids_own_table(tmp_path):
    Detector(["de", "en"], tmp_path)
    table = next(tmp_path.glob("py3langid-*/de-en/nextmove.npy"))
    table.write_bytes(table.read_bytes()[:1000])  # cut short, as by a full disk
    detector = Detector(["de", "en"], tmp_path)
    assert detector.detect("Zwei Hunde spielen im Schnee.")[0] == "de"
    assert detector.detect("Please send me the report by Friday.")[0] == "en"
    Detector(["de", "en"], tmp_path)  # and the cache is built again
    assert table.stat().st_size > 1000
