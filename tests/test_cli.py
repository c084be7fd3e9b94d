"""The command line, on both streams: stdout holds translations only, stderr the rest."""

import gc
import json

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from core.translator import Translator

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input, prog_name="translate")


@pytest.fixture(scope="module")
def expected(model_dir):
    """Reference translations straight from the Python API, to compare the CLI against."""
    translator = Translator.load(str(model_dir), device="cpu")
    return lambda lines, **opts: translator.translate(lines, max_length=8, **opts)


def test_argument(model_dir, expected):
    result = run("-m", model_dir, "--max-length", 8, "A man is riding a bicycle.")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected(["A man is riding a bicycle."])[0] + "\n"
    # a random model runs into the length limit: warnings only, naming the line
    assert all(w.startswith("warning: line 1: ") for w in result.stderr.splitlines())


def test_the_garbage_collector_is_back_on_once_start_up_is_over(model_dir):
    """cli.main turns it off for start-up; the first router turns it on, with what exists
    then frozen; later routers (a session's) freeze nothing, which could hold an old model."""
    gc.disable()  # as cli.main.main does
    try:
        before = gc.get_freeze_count()
        assert run("-m", model_dir, "--max-length", 8, "Hello.").exit_code == 0
        assert gc.isenabled() and gc.get_freeze_count() > before
        frozen = gc.get_freeze_count()
        assert run("-m", model_dir, "--max-length", 8, "Hello.").exit_code == 0
        assert gc.get_freeze_count() <= frozen  # (frozen objects freed by refcount leave it)
    finally:
        gc.unfreeze()
        gc.enable()


def test_stdin_keeps_blank_lines_and_order(model_dir, expected):
    lines = ["Two dogs play in the snow.", "", "   ", "A man is riding.", "Die Kinder lachen."]
    result = run("-m", model_dir, "--max-length", 8, input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == expected(lines)
    assert result.stdout.split("\n")[1:3] == ["", "   "]


def test_crlf_and_missing_final_newline(model_dir, expected):
    result = run("-m", model_dir, "--max-length", 8, input="Two dogs.\r\n\r\nA man")
    assert result.stdout.split("\n")[:-1] == expected(["Two dogs.", "", "A man"])


def test_file_in_file_out(model_dir, expected, tmp_path):
    src, out = tmp_path / "in.en", tmp_path / "out.de"
    lines = ["Where is the train station?", "", "Two dogs play in the snow."]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run("-m", model_dir, "--max-length", 8, "-i", src, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert out.read_text(encoding="utf-8").split("\n")[:-1] == expected(lines)
    assert [p.name for p in tmp_path.iterdir()] != [] and not list(tmp_path.glob("*.part"))


def test_failed_run_leaves_existing_output_alone(model_dir, tmp_path):
    out = tmp_path / "out.de"
    out.write_text("precious\n")
    result = run("-m", tmp_path / "nope", "-o", out, "Hello")
    assert result.exit_code == 3
    assert out.read_text() == "precious\n"
    assert not list(tmp_path.glob("*.part"))


def test_beam_n_best_format(model_dir):
    result = run("-m", model_dir, "--max-length", 6, "-b", 3, "--n-best", 3, "A man.\nTwo dogs.")
    assert result.exit_code == 0, result.stderr
    for line in result.stdout.splitlines():
        fields = line.split("\t")
        assert len(fields) == 6  # text, score, text, score, text, score
        scores = [float(s) for s in fields[1::2]]
        assert scores == sorted(scores, reverse=True)


def test_jsonl(model_dir, expected):
    result = run("-m", model_dir, "--max-length", 8, "--format", "jsonl", "-s", "beam", "-b", 2,
                 "--n-best", 2, input="A man.\n\n")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["source"] for r in records] == ["A man.", ""]
    assert records[0]["translation"] == records[0]["nbest"][0]["text"]
    assert len(records[0]["nbest"]) == 2 and records[1]["translation"] == ""


def test_sampling_flags_imply_sampling_and_seed_repeats(model_dir):
    first = run("-m", model_dir, "--max-length", 8, "-k", 20, "--seed", 3, "A man is riding.")
    again = run("-m", model_dir, "--max-length", 8, "-s", "sample", "-k", 20, "--seed", 3,
                "A man is riding.")
    assert first.exit_code == 0 and first.stdout == again.stdout


@pytest.mark.parametrize("args, message", [
    (["-b", "0"], "beam size must be at least 1"),
    (["-p", "1.5"], "top-p must be in (0, 1]"),
    (["-T", "-1"], "temperature must be >= 0"),
    (["-b", "2", "--n-best", "3"], "n-best (3) cannot exceed the beam size (2)"),
    (["-s", "greedy", "-k", "5"], "--top-k only applies to sampling"),
    (["-s", "beam", "-T", "0.5"], "--temperature only applies to sampling"),
    (["-k", "5", "-b", "2"], "do not go together"),
    (["--format", "xml"], "unknown format"),
])
def test_bad_options_are_one_line_errors(model_dir, args, message):
    result = run("-m", model_dir, *args, "Hello")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_missing_model_is_one_line_error(tmp_path):
    result = run("-m", tmp_path / "missing", "Hello")
    assert result.exit_code == 3
    assert result.stderr.startswith("error: no model directory") and result.stderr.count("\n") == 1


def test_incomplete_model_dir(model_dir, tmp_path):
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    result = run("-m", tmp_path, "Hello")
    assert result.exit_code == 4 and "model.safetensors is missing" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run("-m", tmp_path / "missing", "--debug", "Hello")
    assert result.exit_code != 0 and result.exception is not None


def test_models_lists_embedded_checkpoints(monkeypatch, model_dir):
    from core import models

    monkeypatch.setattr(models, "checkpoints_dir", lambda: model_dir.parent)
    result = run("models")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[1].startswith("tiny-en-de\t")


def test_help_lists_flags_and_subcommands():
    result = run("--help")
    assert result.exit_code == 0
    assert "Usage: translate [OPTIONS] [TEXT]..." in result.stdout
    for flag in ("--beam-size", "--top-p", "--n-best", "--format", "models", "eval", "train"):
        assert flag in result.stdout


def test_help_shows_placeholders_groups_and_defaults():
    result = run("-h")
    assert result.exit_code == 0
    shown = result.stdout
    for placeholder in ["TEXT...", "-i, --input FILE", "-o, --output FILE", "-b, --beam-size N",
                        "-s, --strategy [greedy|beam|sample]", "--device [auto|cpu|cuda]",
                        "--format [text|jsonl]", "Input and output:", "Model:", "Decoding:"]:
        assert placeholder in shown, placeholder
    assert "<" not in shown.replace("<<", "")  # no typer type labels such as <list[str]>
    assert "the model's (en-de" in shown
    assert run("help").stdout == shown and run("--help").stdout == shown
    assert "Train a model" in run("help", "train").stdout


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.startswith("translate ")


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "No such option: --bogus"),
    (["-b", "x", "hi"], "Invalid value for '--beam-size'"),
    (["-s"], "requires an argument"),
    (["--device", "tpu", "hi"], "unknown device 'tpu'"),
])
def test_parser_errors_are_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.exit_code == 2 and message in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")


@pytest.fixture
def two_models(monkeypatch, tmp_path, model, tokenizer):
    """An embedded en-de and de-en (tiny), and nothing in the cache."""
    from core import checkpoint, models

    from conftest import tiny_model

    root = tmp_path / "embedded"
    for src, tgt in [("en", "de"), ("de", "en")]:
        m = tiny_model(tokenizer.vocab_size, source_lang=src, target_lang=tgt,
                       final_logits_bias=True)
        if src == "de":  # tells itself apart: it says "Q" and nothing else
            with torch.no_grad():
                m.logits_bias[tokenizer.encode("Q")[0]] = 1e4
        checkpoint.save(m, tokenizer, root / f"{src}-{tgt}")
    monkeypatch.setattr(models, "checkpoints_dir", lambda: root)
    # the session's cache holds the models other tests converted
    monkeypatch.setenv("TRANSLATE_CACHE", str(tmp_path / "cache"))
    return root


def test_models_on_a_pipe_and_as_json(two_models):
    lines = run("models").stdout.splitlines()
    assert lines[0].split("\t") == ["name", "languages", "size", "precision", "where",
                                    "decoding", "path"]
    assert [line.split("\t")[:2] for line in lines[1:]] == [["de-en", "de->en"], ["en-de", "en->de"]]
    records = json.loads(run("models", "--json").stdout)
    assert {r["name"]: r["where"] for r in records} == {"de-en": "embedded", "en-de": "embedded"}
    assert records[0]["precision"] == "float32"
    removed = run("models", "remove", "en-de")
    assert removed.exit_code == 2 and "embedded" in removed.stderr


def test_from_and_to_pick_the_model(two_models):
    from core import models

    assert models.pick(None, "deu", "en") == (str(two_models / "de-en"),)
    assert models.pick(None, "de") == (str(two_models / "de-en"),)
    assert models.pick(None, None, "de") == (str(two_models / "en-de"),)
    assert models.pick("x", "de", "en") == ("x",)  # -m wins
    assert models.pick(None) == ()  # the default model
    missing = run("-f", "fr", "-t", "de", "Bonjour")  # offline: the Hub cannot be asked
    assert missing.exit_code == 3 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith(
        "error: no installed model translates fr to de nor fr to en then en to de; could not "
        "ask the Hub for Helsinki-NLP/opus-mt-fr-de, Helsinki-NLP/opus-mt-fr-en "
        "(HF_HUB_OFFLINE is set); installed: de-en (de->en), en-de (en->de)")
    ok = run("-f", "de", "--max-length", "4", "Hallo")
    assert ok.exit_code == 0 and ok.stdout.count("\n") == 1


MIXED = ["A man is riding a bicycle down the street.", "Ein Mann fährt mit dem Fahrrad die Straße "
         "entlang.", "", "Ok", "Two dogs are playing in the deep snow today."]


def test_lines_go_to_the_model_for_their_language(two_models):
    """No -m, no --from: each line is translated by the model for its detected language; a
    line too short to judge goes to the default route; one output line per input line."""
    by_model = {name: Translator.load(str(two_models / name), device="cpu") for name in ("en-de", "de-en")}
    want = [by_model["de-en" if i == 1 else "en-de"].translate([line], max_length=6)[0]
            for i, line in enumerate(MIXED)]
    result = run("--max-length", 6, input="\n".join(MIXED) + "\n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == want
    assert want[1] == "QQQQQQ" and "Q" not in want[0]  # the de-en model took line 2 alone


def test_to_passes_lines_already_in_that_language(two_models):
    result = run("--to", "de", "--max-length", 6, "--format", "jsonl",
                 input="\n".join(MIXED[:2]) + "\n")
    records = [json.loads(x) for x in result.stdout.splitlines()]
    assert records[1]["translation"] == MIXED[1]
    assert records[1]["warnings"] == ["already in de: passed through"]
    assert "warning: line 2: already in de: passed through" in result.stderr


def test_a_line_in_another_language_than_the_model_reads_is_flagged(two_models):
    result = run("-m", "en-de", "--max-length", 6, input="\n".join(MIXED[:2]) + "\n")
    assert result.exit_code == 0 and result.stdout.count("\n") == 2
    assert "warning: line 2: looks like de" in result.stderr
    assert "line 1: looks like" not in result.stderr
