"""What a person at a terminal sees: --show confidence and attention (values against the model,
plain and jsonl output), the n-best table, and the interactive session on a real terminal
(tmux: the screen is captured and checked)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TEXTS, tiny_model
from rich.console import Console
from typer.testing import CliRunner

from cli import views
from cli.main import app
from core import checkpoint
from core.explain import explain
from core.segment import safe
from core.translator import Candidate, Translator

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input, prog_name="translate")


@pytest.fixture(scope="module")
def translator(model_dir):
    return Translator.load(str(model_dir), device="cpu")


def test_token_probabilities_are_the_models(translator):
    """Greedy decoding's score without a length penalty is the sum of its tokens'
    log-probabilities (EOS included): the explanation's, from its own teacher-forced pass, add
    up to it."""
    flags = dict(strategy="greedy", max_length=12, length_penalty=0.0)
    options = translator.options(**flags)
    for line in TEXTS[:4]:
        (e,) = explain(translator, line, options)
        score = translator.translate_nbest([line], **flags)[0][0].score
        assert sum(e.logprobs) + e.end == pytest.approx(score, abs=1e-4)
        assert safe("".join(e.target)) == translator.translate(
            [line], strategy="greedy", max_length=12)[0]
        for word, p, ids in e.words():  # a word's probability: its tokens' multiplied
            assert p == pytest.approx(torch.tensor([e.logprobs[i] for i in ids]).sum().exp().item())


def test_attention_rows_are_distributions_and_the_heatmap_draws_them(translator):
    options = translator.options(strategy="greedy", max_length=10)
    (e,) = explain(translator, TEXTS[2], options)
    assert e.attention.shape == (len(e.target), len(e.source))
    torch.testing.assert_close(e.attention.sum(1), torch.ones(len(e.target)))
    words = e.word_attention()
    torch.testing.assert_close(words.sum(1), torch.ones(len(e.words())))
    drawn = views.heatmap(e, width=200).plain.splitlines()[2:]  # the key, the numbers, rows
    assert len(drawn) == len(e.words())
    top = len(views.SHADES) - 1
    for line, row in zip(drawn, words):  # each cell shaded by its word-to-word weight
        cells = line[views.LABEL + 1:][::views.CELL]  # one character per source word
        assert cells == "".join(views.SHADES[min(int(w * len(views.SHADES)), top)]
                                for w in row.tolist())
    assert [a["source"] for a in views.alignment(e)] == [
        e.source_words()[int(r.argmax())][0].strip() for r in words]


def test_a_narrow_heatmap_says_what_it_left_out(translator):
    (e,) = explain(translator, "Two dogs play in the snow and the children laugh at them.",
                   translator.options(strategy="greedy", max_length=6))
    text = views.heatmap(e, width=30).plain
    assert max(len(line) for line in text.splitlines()[1:-1]) <= 30
    assert text.rstrip().endswith("more source words not shown)")


def test_show_on_a_pipe_is_plain_and_jsonl_carries_the_values(model_dir, translator):
    plain = run("-m", model_dir, "-s", "greedy", "--max-length", 8, input=TEXTS[0] + "\n")
    shown = run("-m", model_dir, "-s", "greedy", "--max-length", 8, "--show", "confidence",
                input=TEXTS[0] + "\n")
    assert shown.exit_code == 0 and shown.stdout == plain.stdout  # no colour codes, same text
    result = run("-m", model_dir, "-s", "greedy", "--max-length", 8, "--format", "jsonl",
                 "--show", "confidence,attention", input=f"{TEXTS[0]}\n\n{TEXTS[2]}\n")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 3 and "tokens" not in records[1]
    for record in (records[0], records[2]):
        assert safe("".join(t["text"] for t in record["tokens"])) == record["translation"]
        assert all(t["logprob"] <= 0 for t in record["tokens"])
        assert {"target", "source", "weight"} <= set(record["alignment"][0])
    assert "1 " in result.stderr  # the heat map's key, on stderr


def test_show_takes_known_views_only(model_dir):
    result = run("-m", model_dir, "--show", "colours", "Hello")
    assert result.exit_code == 2 and "--show takes confidence, attention" in result.stderr


def test_nbest_table_and_confidence_colours():
    console = Console(record=True, width=80, color_system="truecolor", force_terminal=True)
    console.print(views.nbest_table([Candidate("Ein Mann.", -0.5), Candidate("Mann.", -1.25)]))
    text = console.export_text()
    assert "rank" in text and "-1.2500" in text and "Ein Mann." in text
    assert views.style(0.9) == "" and views.style(0.1).startswith("underline")
    assert len({views.style(p) for p in (0.9, 0.6, 0.3, 0.1)}) == 4


# ---- the interactive session, on a real terminal --------------------------------------------

pytestmark_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


class Screen:
    """A tmux session running one command, its screen read back as text."""

    def __init__(self, command: str, name: str):
        self.name = name
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "100", "-y", "50",
                        command], check=True)

    def text(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name],
                              capture_output=True, text=True).stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def wait(self, text: str, after: str = "", timeout: float = 60) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            screen = self.text()
            if text in screen.split(after, 1)[-1] if after else text in screen:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never appeared; the screen:\n{self.text()}")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


@pytestmark_tmux
def test_interactive_session(tokenizer, tmp_path):
    """It starts, translates two lines, changes the beam size, cancels a long translation with
    Ctrl-C, keeps the history, and leaves with Ctrl-D."""
    slow = tiny_model(tokenizer.vocab_size, max_positions=4096, final_logits_bias=True)
    with torch.no_grad():  # it never ends a sentence before its limit: long enough to cancel
        slow.logits_bias[tokenizer.eos_id] = -1e4
    path = checkpoint.save(slow, tokenizer, tmp_path / "model")
    expected = Translator.load(str(path), device="cpu").translate(TEXTS[:2])
    env = (f"XDG_STATE_HOME={tmp_path / 'state'} TRANSLATE_CACHE={tmp_path / 'cache'} "
           f"PYTHONPATH={ROOT}")
    screen = Screen(f"cd {ROOT} && env {env} {sys.executable} -m cli.main -m {path}; "
                    "echo EXIT=$?; sleep 60", f"translate-test-{os.getpid()}")
    try:
        screen.wait("Ctrl-D to leave")
        screen.keys(TEXTS[0], "Enter")
        screen.keys(TEXTS[1], "Enter")
        shown = screen.wait(expected[1], after=TEXTS[1])
        assert expected[0] in shown.split(TEXTS[0], 1)[1]
        screen.keys(":beam 3", "Enter")
        screen.wait("decoding: beam 3")
        screen.keys(":max 4000", "Enter")
        screen.keys(":greedy", "Enter")
        screen.wait("at most 4000 tokens", after=":greedy")
        screen.keys("This line decodes for a long time.", "Enter")
        time.sleep(0.5)
        screen.keys("C-c")
        screen.wait("cancelled")
        screen.keys(":help", "Enter")
        screen.wait(":quit or Ctrl-D")
        screen.keys("C-d")
        screen.wait("EXIT=0")
        history = (tmp_path / "state" / "translate" / "history").read_text()
        assert TEXTS[0] in history and ":beam 3" in history
    finally:
        screen.close()


def test_nbest_on_a_terminal_is_a_table_per_line(model_dir, tmp_path):
    from test_shell import on_a_terminal

    source = tmp_path / "in.txt"
    source.write_text(f"{TEXTS[0]}\n{TEXTS[2]}\n")
    code, screen = on_a_terminal([sys.executable, "-m", "cli.main", "-m", str(model_dir),
                                  "--n-best", "2", "--max-length", "6", "-i", str(source)])
    assert code == 0, screen
    assert screen.count("rank") == 2 and "\t" not in screen
