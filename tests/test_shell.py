"""The shell contract, on real processes where the OS decides: -o onto FIFOs, symlinks,
devices and read-only folders; file modes; input that arrives slowly; the Python API's types."""

from __future__ import annotations

import os
import pty
import select
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.workers import shares

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-length", "3"]


def translate(model_dir, *args, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cli.main", "-m", str(model_dir), *FAST, *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=120, **kwargs)


def popen(model_dir, *args, **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-m", "cli.main", "-m", str(model_dir), *FAST, *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(command, cwd=ROOT, env=env, **kwargs)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "in.en"
    path.write_text("A dog runs.\n\nTwo cats sleep.\n", encoding="utf-8")
    return path


def test_output_into_a_fifo_streams_to_its_reader(model_dir, source, tmp_path):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    result = translate(model_dir, "-i", source, "-o", fifo)
    reader.join(timeout=60)
    assert result.returncode == 0, result.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)  # still a FIFO, not replaced by a file
    assert got and got[0].count(b"\n") == 3


def test_output_through_a_symlink_writes_its_target(model_dir, source, tmp_path):
    target, link = tmp_path / "real.de", tmp_path / "link.de"
    target.write_text("old\n")
    link.symlink_to(target)
    result = translate(model_dir, "-i", source, "-o", link)
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text().count("\n") == 3


def test_output_keeps_mode_or_follows_the_umask(model_dir, source, tmp_path):
    existing = tmp_path / "shared.de"
    existing.write_text("old\n")
    existing.chmod(0o640)
    assert translate(model_dir, "-i", source, "-o", existing).returncode == 0
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640
    new = tmp_path / "new.de"
    result = translate(model_dir, "-i", source, "-o", new,
                       preexec_fn=lambda: os.umask(0o027))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(new.stat().st_mode) == 0o640  # 0666 & ~027


def test_output_to_a_character_device(model_dir, source):
    ok = translate(model_dir, "-i", source, "-o", "/dev/null")
    assert ok.returncode == 0, ok.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    full = translate(model_dir, "-i", source, "-o", "/dev/full")
    assert full.returncode == 1
    assert full.stderr.decode().strip().splitlines()[-1].startswith("error: No space left")
    assert b"Traceback" not in full.stderr


def test_output_dash_is_stdout(model_dir, source, tmp_path):
    result = translate(model_dir, "-i", source, "-o", "-")
    assert result.returncode == 0 and result.stdout.count(b"\n") == 3
    assert not (ROOT / "-").exists()


@pytest.mark.parametrize("make, why", [
    (lambda d: d, "is a directory"),
    (lambda d: d / "missing" / "out.de", "does not exist"),
])
def test_bad_output_paths_fail_before_loading(model_dir, source, tmp_path, make, why):
    result = translate(tmp_path / "no-such-model", "-i", source, "-o", make(tmp_path))
    assert result.returncode == 2, result.stderr  # 2, not 3: the model was never looked at
    assert why in result.stderr.decode() and result.stderr.count(b"\n") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(model_dir, source, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        result = translate(model_dir, "-i", source, "-o", folder / "out.de")
    finally:
        folder.chmod(0o700)
    assert result.returncode == 2 and b"Permission denied" in result.stderr


def test_proc_is_a_clear_error(model_dir, source):
    result = translate(model_dir, "-i", source, "-o", "/proc/translate-test")
    assert result.returncode == 2 and result.stderr.count(b"\n") == 1
    assert b"Traceback" not in result.stderr


def test_first_line_comes_out_before_the_writer_finishes(model_dir):
    """(echo A; sleep; echo B) | translate: A's translation appears while B is not written."""
    proc = popen(model_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                 stderr=subprocess.DEVNULL)
    try:
        proc.stdin.write(b"A dog runs.\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "no output while the writer pauses"
        first = proc.stdout.readline()
        assert first.endswith(b"\n")
        proc.stdin.write(b"Two cats sleep.\n")
        proc.stdin.close()
        rest = proc.stdout.read()
        assert rest.count(b"\n") == 1
    finally:
        proc.kill()
        proc.wait()


def test_dash_input_is_stdin(model_dir):
    result = translate(model_dir, "-i", "-", input=b"One.\nTwo.\n")
    assert result.returncode == 0 and result.stdout.count(b"\n") == 2


def on_a_terminal(command: list[str], **env) -> tuple[int, str]:
    """Run `command` with stdout and stderr on a pseudo-terminal: its exit code and screen."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), **env),
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    seen = b""
    deadline = time.time() + 60
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(master)
    return proc.returncode, seen.decode("utf-8", "replace")


def test_a_terminal_gets_batched_lines_and_progress(model_dir, source):
    """stdout and stderr on a pseudo-terminal, -i FILE: one line per input line (batched, not
    token by token), and the run ends normally."""
    code, screen = on_a_terminal([sys.executable, "-m", "cli.main", "-m", str(model_dir), *FAST,
                                  "-i", str(source)])
    assert code == 0
    assert "Traceback" not in screen


def test_models_on_a_terminal_is_a_table(tmp_path):
    code, screen = on_a_terminal([sys.executable, "-m", "cli.main", "models"],
                                 TRANSLATE_CACHE=str(tmp_path), COLUMNS="120")
    assert code == 0, screen
    lines = screen.splitlines()
    header = next(line for line in lines if "name" in line and "languages" in line)
    assert all(word in header for word in ("size", "precision", "where", "decoding", "path"))
    assert any("en-de (default)" in line and "en->de" in line for line in lines)
    assert any("de-en" in line and "de->en" in line and "embedded" in line for line in lines)
    assert "\t" not in screen and any(c in screen for c in "┃│|")  # drawn, not tab-separated


def test_python_api_refuses_a_str(model_dir):
    from core.translator import Translator

    translator = Translator.load(str(model_dir), device="cpu")
    with pytest.raises(TypeError, match="not one str"):
        translator.translate("Hi there")


# ---- --workers: processes side by side ---------------------------------------------------

LINES = [f"{text} {i}" if i % 7 else "" for i, text in
         enumerate(["A dog runs.", "Two cats sleep in the sun.", "Ein Hund läuft."] * 70)]


def test_workers_give_the_same_lines_in_the_same_order(model_dir, tmp_path):
    data = ("\n".join(LINES) + "\n").encode() + b"bad \xff byte\n"
    one = translate(model_dir, "-s", "greedy", input=data)
    three = translate(model_dir, "-s", "greedy", "--workers", "3", input=data)
    assert one.returncode == three.returncode == 0, three.stderr
    assert three.stdout == one.stdout and len(three.stdout.splitlines()) == len(LINES) + 1
    (tmp_path / "src").write_text("\n".join(LINES[:50]) + "\n")
    scores = [subprocess.run(
        [sys.executable, "-m", "cli.main", "eval", "-m", str(model_dir), *FAST, "--src",
         tmp_path / "src", "--ref", tmp_path / "src", "--workers", n], cwd=ROOT,
        capture_output=True, timeout=120).stdout.splitlines()[:2] for n in ("1", "2")]
    assert scores[0] == scores[1] and scores[0][0].startswith(b"BLEU")


def test_workers_share_the_last_lines_evenly_and_hold_no_line_a_stream_waits_after():
    """The input's tail goes to the workers in near-equal chunks (64 lines in chunks of 64
    would leave one of two idle), every line once and in order; a stream that pauses has what
    it sent sent on at once, never held back to look ahead."""
    def sizes(n_lines: int, n: int = 2) -> list[int]:
        parts = list(shares([str(i) for i in range(n_lines)], 64, n))
        assert [line for _, part in parts for line in part] == [str(i) for i in range(n_lines)]
        assert all(first == int(part[0]) + 1 for first, part in parts)  # 1-based line numbers
        return [len(part) for _, part in parts]

    assert sizes(64) == [32, 32] and sizes(200) == [64, 64, 36, 36] and sizes(128) == [64, 64]
    assert sizes(200, n=4) == [50, 50, 50, 50] and sizes(1) == [1] and sizes(0) == []
    read = []

    def slow_stream():
        for i in range(5):
            read.append(i)
            yield str(i)

    sent = [part for _, part in shares(slow_stream(), 64, 2, ready=lambda: False)]
    assert sent == [[str(i)] for i in range(5)]
    for _, part in shares(slow_stream(), 64, 2, ready=lambda: False):
        assert part == [str(read[-1])]  # out before the next line was read


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.parent.name))
    return found


def started_with_workers(model_dir, n: int) -> tuple[subprocess.Popen, list[int]]:
    """A run with `n` workers on a pipe that stays open, once its first line is out."""
    proc = popen(model_dir, "-s", "greedy", "--workers", str(n), stdin=subprocess.PIPE,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    proc.stdin.write(b"A dog runs.\n")
    proc.stdin.flush()
    assert proc.stdout.readline()  # translated: the workers are up
    workers = children(proc.pid)
    assert len(workers) >= n
    return proc, workers


def test_ctrl_c_stops_every_worker(model_dir):
    proc, workers = started_with_workers(model_dir, 2)
    os.killpg(proc.pid, 2)  # the terminal sends SIGINT to the whole group
    assert proc.wait(timeout=30) == 130
    assert b"Traceback" not in proc.stderr.read()
    time.sleep(0.5)
    assert not [p for p in workers if Path(f"/proc/{p}").exists()
                and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]]


def test_a_worker_that_dies_is_a_one_line_error(model_dir):
    proc, workers = started_with_workers(model_dir, 2)
    os.kill(workers[-1], 9)
    proc.stdin.write(b"Two cats sleep.\n" * 50)
    proc.stdin.close()
    assert proc.wait(timeout=60) == 1
    err = proc.stderr.read().decode()
    assert "error: a translation worker" in err and "died (signal 9)" in err
    assert "Traceback" not in err
