"""Every sentence translated, nothing corrupted: segmentation, protected spans, safe text, and
the length and repetition guards."""

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli.main import app
from conftest import tiny_model
from core import checkpoint, segment
from core.search import NEG_INF, ban_repeats
from core.translator import Candidate, Translator

SENTENCES = ["The dog runs.", "Is it late?", "Wow!", "We can have lunch by the river.",
             "Mr. Smith arrived at 5 p.m. yesterday.", "She said yes.", "42.", "Great 🙂!",
             "Mail jo.doe@example.com today.", "Open `make test` now."]
SEPARATORS = [" ", "  ", "\t", " \t "]


class Bracketing(Translator):
    """A Translator whose model is a pure function, «text»: what the line around it becomes
    is then fully predictable."""

    def _decode_texts(self, texts, options, strategy, on_split=None, where=None):
        for t, text in enumerate(texts):
            yield t, [Candidate(f"«{text}»", 0.0)]


@pytest.fixture(scope="module")
def bracketing(model, tokenizer):
    return Bracketing(model, tokenizer)


def expected_line(lead, sentences, seps, trail):
    parts = [f"«{s}»" if segment.needs_model(segment.PROTECTED.sub(" ", s)) else s
             for s in sentences]
    return lead + "".join(p + sep for p, sep in zip(parts, seps + [""])) + trail


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sentences=st.lists(st.sampled_from(SENTENCES), min_size=1, max_size=6),
       data=st.data(), lead=st.sampled_from(["", " ", "\t", "  "]),
       trail=st.sampled_from(["", " ", "\t "]))
def test_each_sentence_translated_separators_kept(bracketing, sentences, data, lead, trail):
    """A line of several sentences comes back as one line: each sentence translated as a unit
    (protected spans restored inside it), the whitespace between and around them as it was."""
    seps = [data.draw(st.sampled_from(SEPARATORS)) for _ in sentences[1:]]
    line = lead + "".join(s + sep for s, sep in zip(sentences, seps + [""])) + trail
    lines = [line, "", "   "]
    out = bracketing.translate(lines)
    assert out[0] == expected_line(lead, sentences, seps, trail)
    assert out[1:] == ["", "   "]


def test_protected_spans_are_not_seen_by_the_model_and_come_back(bracketing):
    line = ("See https://example.com/a?b=1, write to jo.doe@example.com, run `ls -la` in "
            "/var/log/app or C:\\Temp\\setup.log and open src/main.rs.")
    sentence, = segment.split(line, "en")
    assert "http" not in sentence.text and "@" not in sentence.text and "`" not in sentence.text
    assert sentence.spans == ["https://example.com/a?b=1", "jo.doe@example.com", "`ls -la`",
                              "/var/log/app", "C:\\Temp\\setup.log", "src/main.rs"]
    assert bracketing.translate([line]) == [f"«{line}»"]


SPAN_LINES = [
    "Visit https://docs.example.org/v2/install for the steps.",
    "Write to anna.schmidt@mail.example.de if you have questions.",
    "The log is in /var/log/nginx/error.log and the config in ~/app/config.yaml.",
    "Run `pip install -e .` first, then `pytest -q`.",
    "Call 0800 123 456 or pay $19.99 before 2024-05-01.",
    "42",
    "🙂🙂",
    "---",
]


def test_spans_survive_a_real_model_byte_for_byte(model, tokenizer):
    """With a real (random, tiny) model that copies nothing, every protected span and every
    letterless segment still comes back byte for byte: the fallback translates around them."""
    out = Translator(model, tokenizer).translate(SPAN_LINES, max_length=12)
    for line, translation in zip(SPAN_LINES, out):
        for sentence in segment.split(line, "en"):
            for span in sentence.spans:
                assert span in translation, (span, translation)
    assert out[5:] == ["42", "🙂🙂", "---"]
    for line, translation in zip(SPAN_LINES, out):  # numbers, dates, prices too
        for sentence in segment.split(line, "en"):
            assert segment.kept(translation, sentence.checked), (sentence.checked, translation)


def test_what_is_checked_and_what_the_model_may_change():
    sentence, = segment.split("On 2024-05-01 at 10:30, @jo_dev paid $19.99 for 3 tickets "
                              "(v2.1.0, max_retries, parseArgs(), --dry-run, GitHub, "
                              "TICKET-77) 🎉, see <https://x.example/7>.", "en")
    assert sentence.checked == ["2024-05-01", "10:30", "@jo_dev", "$19.99", "3", "v2.1.0",
                                "max_retries", "parseArgs()", "--dry-run", "GitHub",
                                "TICKET-77", "🎉"]  # the URL is a placeholder: never checked
    # ordinals, units, words with digits and all-capitals are the model's to translate
    sentence, = segment.split("The 3rd run took 5km of MP3 files, WARNING.", "en")
    assert sentence.checked == []
    # a decimal point may become a comma and back; digits never change, nor merge into others
    assert segment.kept("Es kostet 3,5 € für 1.000 Stück.", ["3.5", "1,000"])
    assert not segment.kept("Zimmer 142.", ["42"]) and not segment.kept("Um 10:31.", ["10:30"])
    assert not segment.kept("Zwei und 7.", ["7", "7"])


class MangledDigits(Translator):
    """A model that «brackets» its input and writes every digit it reads as 7, or every decimal
    point as a comma; it copies placeholders. Counts what it is asked to translate."""

    def __init__(self, *args, decimal_comma=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.decimal_comma, self.asked = decimal_comma, []

    def _decode_texts(self, texts, options, strategy, on_split=None, where=None):
        for t, text in enumerate(texts):
            self.asked.append(text)
            out = re.sub(r"(?<=\d)\.(?=\d)", ",", text) if self.decimal_comma else \
                re.sub(r"(?<!<x)\d", "7", text)
            yield t, [Candidate(f"«{out}»", 0.0)]


def test_a_lost_number_is_translated_again_with_it_protected(model, tokenizer):
    line = "Room 42 opens at 10:30 for @anna_k, see https://example.com/r/12."
    mangling = MangledDigits(model, tokenizer)
    assert mangling.translate([line]) == [f"«{line}»"]
    assert mangling.asked == ["Room 42 opens at 10:30 for @anna_k, see <x1>.",
                              "Room <x1> opens at <x2> for <x3>, see <x4>."]
    streamed = MangledDigits(model, tokenizer)
    assert "".join(streamed.stream(line)) == f"«{line}»"
    commas = MangledDigits(model, tokenizer, decimal_comma=True)  # a German decimal comma
    assert commas.translate(["It costs 3.5 euros."]) == ["«It costs 3,5 euros.»"]
    assert len(commas.asked) == 1  # kept as the model wrote it: no second try


def test_spans_are_protected_before_the_segmenter_cuts():
    """The segmenter never sees a span: "./build/x.bin" or a URL before a full stop stay whole."""
    sentences = segment.split("Open ./build/out.bin now. Saved as ./dist/a.tar.gz. See "
                              "https://example.com/x.", "en")
    assert [s.spans for s in sentences] == [["./build/out.bin"], ["./dist/a.tar.gz"],
                                            ["https://example.com/x"]]
    assert [s.text for s in sentences] == ["Open <x1> now.", "Saved as <x1>.", "See <x1>."]


def test_segmentation_keeps_every_character():
    for line in ["  One. Two!  Three?\t", "No end", "Dr. No met Mr. X. Then he left.", " "]:
        rebuilt = "".join(s.lead + s.source + s.trail for s in segment.split(line, "en"))
        assert rebuilt == line


@pytest.fixture
def rigged(tokenizer):
    """A model that always says ESC (0x1b), the start of every terminal escape sequence."""
    model = tiny_model(tokenizer.vocab_size, final_logits_bias=True)
    esc = tokenizer.encode("\x1b")[0]
    with torch.no_grad():
        model.logits_bias[esc] = 1e4
    return model, esc


def test_no_control_character_ever_printed(rigged, tokenizer, model):
    model_esc, _ = rigged
    for m, options in [(model_esc, dict(strategy="greedy")),
                       (model, dict(strategy="sample", temperature=1.5, seed=1))]:
        for text in Translator(m, tokenizer).translate(SENTENCES, max_length=20, **options):
            assert not re.search(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]", text), repr(text)
        for piece in Translator(m, tokenizer).stream(SENTENCES[3], max_length=20, **options):
            assert "\x1b" not in piece
    assert segment.safe("a\x1b[31mb\u202ec\td\ne") == "a[31mbc\td e"


def test_length_follows_the_source_and_is_reported(rigged, tokenizer):
    """A model that never ends stops at factor x source tokens + 10 (below --max-length),
    and says so; the loop is reported too."""
    model, esc = rigged
    translator = Translator(model, tokenizer)
    nbest = translator.translate_nbest(["Wow!"], strategy="greedy", max_length=200,
                                       max_length_factor=2.0)
    n = len(tokenizer.encode("Wow!"))
    limit = 2 * n + 10
    assert any(f"hit the length limit ({limit} tokens)" == w for w in nbest[0][0].warnings)
    cap = translator.translate_nbest(["Wow!"], strategy="greedy", max_length=3)
    assert "hit the length limit (3 tokens)" in cap[0][0].warnings


def test_no_repeat_ngram_bans_what_would_repeat():
    logprobs = torch.zeros(2, 6)
    history = torch.tensor([[1, 2, 3, 1], [4, 4, 5, 5]])
    banned = ban_repeats(logprobs, history, 2)  # row 0 ends in 1, and "1 2" was said
    assert banned[0].tolist() == [0, 0, NEG_INF, 0, 0, 0]
    assert banned[1].tolist() == [0, 0, 0, 0, 0, NEG_INF]  # "5 5" was said
    assert ban_repeats(logprobs, history, 1)[1].tolist() == [0, 0, 0, 0, NEG_INF, NEG_INF]
    assert torch.equal(ban_repeats(logprobs, history[:, :1], 2), logprobs)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_no_repeat_ngram_through_decoding(rigged, tokenizer, strategy):
    """The rigged model wants ESC forever; with no_repeat_ngram 1 no token comes twice."""
    from core.generate import generate
    from core.search import DecodeOptions

    model, esc = rigged
    options = DecodeOptions(strategy=strategy, beam_size=2, max_length=10, no_repeat_ngram=1)
    src, mask = Translator(model, tokenizer).pad([tokenizer.encode("Wow!")])
    steps = list(generate(model, src, mask, options.make(tokenizer.eos_id), max_length=10,
                          no_repeat_ngram=1))
    tokens = next(s.finished[0][0].tokens for s in steps if s.finished)
    assert esc in tokens and len(tokens) == len(set(tokens)) == 10


def test_cli_reports_limits_in_jsonl_and_on_stderr(rigged, tokenizer, tmp_path):
    model, _ = rigged
    path = checkpoint.save(model, tokenizer, tmp_path / "rigged")
    result = CliRunner().invoke(app, ["-m", str(path), "--format", "jsonl", "--max-length", "5"],
                                input="Hello there.\n\nOk.\n")
    assert result.exit_code == 0, result.stderr
    records = [__import__("json").loads(x) for x in result.stdout.splitlines()]
    assert [r["warnings"] for r in records] == [["hit the length limit (5 tokens)"], [],
                                                ["hit the length limit (5 tokens)"]]
    assert "warning: line 1: hit the length limit (5 tokens)" in result.stderr
    assert "warning: line 3:" in result.stderr and "line 2" not in result.stderr


def test_user_text_is_never_markup(model_dir, tmp_path):
    result = CliRunner().invoke(app, ["-m", str(model_dir), "-i", str(tmp_path / "[/]oops")])
    assert result.exit_code == 2
    assert "[/]oops" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


class Forgetful(Translator):
    """A model that drops placeholders, changes digits and leaves out a leading comma."""

    def _decode_texts(self, texts, options, strategy, on_split=None, where=None):
        for t, text in enumerate(texts):
            out = re.sub(r"<x\d+>", "", re.sub(r"(?<!<x)\d", "7", text)).lstrip(", ")
            yield t, [Candidate(out, 0.0)]


def test_pieces_translated_apart_keep_their_spans_and_a_space_between(model, tokenizer):
    """Lost again with placeholders: translated piece by piece around the spans; where a
    piece's translation runs into a span though the source had a comma between, a space."""
    out = Forgetful(model, tokenizer).translate(["Sales rose 12% in 2013, but fell."])
    assert out == ["Sales rose 12% in 2013 but fell."]
