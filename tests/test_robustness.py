"""A shell tool lives in pipes and scripts: nothing lost, nothing crashes.

Every case is met the way a user meets it: through the CLI (CliRunner), or a real process for
signals and pipes."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-length", "3"]


def run(model_dir, *args, input=None):
    return runner.invoke(app, ["-m", str(model_dir), *FAST, *map(str, args)], input=input)


def output_lines(stdout: str) -> list[str]:
    assert stdout == "" or stdout.endswith("\n")
    return stdout.split("\n")[:-1]


def count_lines(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


# ---- input --------------------------------------------------------------------------------

text = st.text(st.characters(exclude_characters="\n\r", exclude_categories=("Cs",)), max_size=40)
blank = st.text(st.sampled_from(" \t\u00a0\u3000"), max_size=4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(text, blank), min_size=1, max_size=8), final_newline=st.booleans())
def test_n_lines_in_n_lines_out(model_dir, lines, final_newline):
    """Any mix of text, blank and whitespace lines: one output line per input line, in order;
    blank and whitespace-only lines come back exactly as they were."""
    data = "\n".join(lines) + ("\n" if final_newline else "")
    if not final_newline and lines[-1] == "":
        lines = lines[:-1]  # "a\n" + "" is just "a\n": one line
    result = run(model_dir, input=data.encode())
    assert result.exit_code == 0, result.stderr
    out = output_lines(result.stdout)
    assert len(out) == len(lines)
    for source, translation in zip(lines, out):
        if not source.strip():
            assert translation == source


def test_a_byte_order_mark_begins_no_translation(model_dir, tmp_path):
    """Windows editors start UTF-8 files with U+FEFF, which the models would translate (en-de
    made it U+FFFD): dropped at the start of stdin or a file, kept as text elsewhere."""
    src = tmp_path / "notes.txt"
    src.write_bytes(b"\xef\xbb\xbfTwo dogs.\r\n\xef\xbb\xbfA man.\r\n")
    for result in (run(model_dir, "--format", "jsonl", input=src.read_bytes()),
                   run(model_dir, "--format", "jsonl", "-i", src)):
        assert result.exit_code == 0, result.stderr
        sources = [json.loads(line)["source"] for line in output_lines(result.stdout)]
        assert sources == ["Two dogs.", "\ufeffA man."]


def test_evaluation_files_lose_their_byte_order_mark(tmp_path):
    """translate eval reads sources and references, plain or gzipped, without it."""
    from core.data import read_lines

    data = "\ufeffEin Hund.\nZwei.\n".encode()
    (tmp_path / "ref.de").write_bytes(data)
    (tmp_path / "ref.de.gz").write_bytes(gzip.compress(data))
    for name in ("ref.de", "ref.de.gz"):
        assert read_lines(tmp_path / name) == ["Ein Hund.", "Zwei."]


def test_invalid_utf8_is_replaced_with_one_warning(model_dir):
    result = run(model_dir, input=b"good\n\xff\xfe bad\nfine\n\xc3\n")
    assert result.exit_code == 0
    assert len(output_lines(result.stdout)) == 4
    assert result.stderr.count("invalid UTF-8") == 1
    assert "warning: invalid UTF-8 replaced on line(s) 2, 4\n" in result.stderr


def test_nul_and_control_characters_do_not_crash(model_dir):
    result = run(model_dir, input=b"a\x00b\x01c\x1b[31mred\x7f\n\x00\n\x0b\x0c\n")
    assert result.exit_code == 0, result.stderr
    assert len(output_lines(result.stdout)) == 3


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes_never_lose_lines_or_crash(model_dir, data):
    result = run(model_dir, input=data)
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert len(output_lines(result.stdout)) == count_lines(data)


def test_long_line_is_split_translated_and_joined(model_dir):
    """A sentence longer than the model's 128 positions is not truncated: it is translated in
    pieces that come back joined on its one output line, with a warning naming the line."""
    long = " ".join(f"word{i} and" for i in range(60))  # one sentence: no boundary to cut at
    result = run(model_dir, input=f"short\n{long}\n\nend\n")
    assert result.exit_code == 0, result.stderr
    out = output_lines(result.stdout)
    assert len(out) == 4 and out[2] == ""
    assert "line 2 is longer than the model reads at once" in result.stderr
    pieces = int(result.stderr.split("translated in ")[1].split()[0])
    assert pieces >= 2 and len(out[1].split(" ")) >= pieces


def test_jsonl_keeps_one_record_per_line_for_hostile_input(model_dir):
    result = run(model_dir, "--format", "jsonl", input=b"\x00\n \n\xff\n")
    records = [json.loads(line) for line in output_lines(result.stdout)]
    assert [r["source"] for r in records] == ["\x00", " ", "\ufffd"]


# ---- interruptions and pipes: real processes ---------------------------------------------

@pytest.fixture
def big_input(tmp_path):
    path = tmp_path / "big.en"
    # no digits: a random model drops numbers, and each sentence would be translated again
    # with its number protected (core.translator), tripling the work for nothing here
    names = ("".join(chr(ord("a") + int(d)) for d in str(i)) for i in range(4000))
    path.write_text("".join(f"Line {name} of a long file to translate.\n" for name in names))
    return path


def translate_process(model_dir, *args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "cli.main", "-m", str(model_dir),
                             "--max-length", "40", "--batch-size", "16", *map(str, args)],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, **kwargs)


def test_ctrl_c_flushes_done_lines_and_exits_130(model_dir, big_input):
    proc = translate_process(model_dir, "-i", big_input, stdout=subprocess.PIPE)
    first = proc.stdout.readline()  # translation has started and reached stdout
    proc.send_signal(signal.SIGINT)
    rest, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert stderr.decode().strip().endswith("interrupted") and b"Traceback" not in stderr
    lines = (first + rest).split(b"\n")
    assert first and lines[-1] == b""  # every line written is complete
    assert len(lines) - 1 < 4000


def test_ctrl_c_never_clobbers_the_output_file(model_dir, big_input, tmp_path):
    out = tmp_path / "out.de"
    out.write_text("earlier results\n")
    proc = translate_process(model_dir, "-i", big_input, "-o", out, stdout=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.de.*.part")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in stderr
    assert out.read_text() == "earlier results\n"
    assert not list(tmp_path.glob("*.part"))


def test_closed_pipe_exits_quietly(model_dir, big_input):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = (f"{sys.executable} -m cli.main -m {model_dir} --max-length 40 -i {big_input}"
               " | head -1; echo \"status ${PIPESTATUS[0]}\" >&2")
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True,
                            timeout=120)
    assert result.stdout.count(b"\n") == 1
    said = [s for s in result.stderr.decode().splitlines() if not s.startswith("warning: line")]
    assert said == ["status 141"]  # nothing else: no traceback


# ---- broken models and wrong usage ---------------------------------------------------------

def broken_copy(model_dir, tmp_path, name, content: bytes | None):
    copy = tmp_path / "model"
    copy.mkdir()
    for f in model_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    if content is None:
        (copy / name).unlink()
    else:
        (copy / name).write_bytes(content)
    return copy


@pytest.mark.parametrize("name, content, message", [
    ("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header", "not a readable safetensors file"),
    ("model.safetensors", None, "model.safetensors is missing"),
    ("config.json", b"{broken", "config.json is not valid JSON"),
    ("config.json", b'{"vocab_size": 300, "d_model": 48, "n_heads": 4}', "does not match config.json"),
    ("config.json", b'{"vocab_size": 1000000000000, "d_model": 512}', "more than this tool loads"),
    ("tokenizer.json", b"[]", "not a valid tokenizer file"),
])
def test_broken_model_directory(model_dir, tmp_path, name, content, message):
    broken = broken_copy(model_dir, tmp_path, name, content)
    result = runner.invoke(app, ["-m", str(broken), "hello"])
    assert result.exit_code == 4
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_truncated_weights(model_dir, tmp_path):
    data = (model_dir / "model.safetensors").read_bytes()
    broken = broken_copy(model_dir, tmp_path, "model.safetensors", data[: len(data) - 1000])
    result = runner.invoke(app, ["-m", str(broken), "hello"])
    assert result.exit_code == 4 and "model.safetensors" in result.stderr


def test_cuda_where_there_is_none(model_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["-m", str(model_dir), "--device", "cuda", "hello"])
    assert result.exit_code == 5 and "--device cpu" in result.stderr


def test_unreadable_input_file(model_dir, tmp_path):
    result = runner.invoke(app, ["-m", str(model_dir), "-i", str(tmp_path / "nope.txt")])
    assert result.exit_code == 2 and "cannot read" in result.stderr


def test_progress_bar_counts_lines_only_on_a_terminal():
    import io

    from rich.console import Console

    from cli.render import progress_bar

    screen = io.StringIO()
    terminal = lambda: Console(file=screen, force_terminal=True, width=100)  # noqa: E731
    with progress_bar(terminal, 300, enabled=True) as advance:
        for _ in range(120):
            advance()
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # colours out
    assert "translating" in shown and "120/300 lines" in shown and "/s" in shown
    assert "bytes" not in shown
    quiet = io.StringIO()
    with progress_bar(lambda: Console(file=quiet), 100, enabled=False) as advance:
        advance()
    assert quiet.getvalue() == ""
