"""`translate batch`: many files into an output folder, on this machine or on a local Ray
cluster, each output identical to `translate -i` of its input, complete or not written."""

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import TEXTS, tiny_model
from typer.testing import CliRunner

from cli import batch
from cli.main import app
from core import checkpoint

runner = CliRunner()
FAST = ["-s", "greedy", "--max-length", "6"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args], prog_name="translate")


def single(model_dir, path) -> bytes:
    """What `translate -i FILE` prints, to compare a batch output with."""
    result = run("-m", model_dir, *FAST, "-i", path)
    assert result.exit_code == 0, result.stderr
    return result.stdout.encode()


@pytest.fixture
def inputs(tmp_path):
    """Three files of a few hundred lines (one in a subfolder), and one with invalid UTF-8,
    blank lines and no final newline."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for n, name in enumerate(["a.txt", "b.txt", "sub/c.txt"]):
        lines = [TEXTS[(i + n) % len(TEXTS)] if i % 9 else "" for i in range(200 + 50 * n)]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "odd.txt").write_bytes(b"A dog.\n\xff\xfe broken\n\n  \nno newline at the end")
    return folder


def outputs_match(model_dir, inputs, out):
    for name in ["a.txt", "b.txt", "sub/c.txt", "odd.txt"]:
        got = (out / name).read_bytes()
        assert got == single(model_dir, inputs / name), name
    assert len((out / "odd.txt").read_bytes().splitlines()) == 5  # 5 lines in, 5 out


def test_local_batch_is_translate_i_per_file(model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    result = run("batch", inputs, "-d", out, "-m", model_dir, *FAST, "--workers", 2)
    assert result.exit_code == 0, result.stderr
    outputs_match(model_dir, inputs, out)
    assert "invalid UTF-8 replaced on line(s) 2" in result.stderr
    assert not [p for p in out.rglob(".*")]  # no temporary file left behind


def test_outputs_are_never_overwritten_by_mistake(model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "a.txt").write_text("mine\n")
    result = run("batch", inputs / "a.txt", "-d", out, "-m", model_dir, *FAST)
    assert result.exit_code == 2 and "--force replaces them" in result.stderr
    assert (out / "a.txt").read_text() == "mine\n"
    assert run("batch", inputs / "a.txt", "-d", out, "-m", model_dir, *FAST, "--force").exit_code == 0
    assert (out / "a.txt").read_bytes() == single(model_dir, inputs / "a.txt")
    clash = run("batch", inputs / "a.txt", inputs / "sub" / "c.txt", inputs / "a.txt", "-d",
                tmp_path / "o2", "-m", model_dir, *FAST)
    assert clash.exit_code == 2 and "would both be written to" in clash.stderr
    itself = run("batch", inputs / "a.txt", "-d", inputs, "-m", model_dir, *FAST, "--force")
    assert itself.exit_code == 2 and "overwritten by its own translation" in itself.stderr


def test_a_bad_input_is_named_and_the_others_complete(model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    result = run("batch", inputs / "a.txt", tmp_path / "missing.txt", str(inputs / "*.none"),
                 inputs / "b.txt", "-d", out, "-m", model_dir, *FAST)
    assert result.exit_code == 6
    assert f"error: {tmp_path / 'missing.txt'}: " in result.stderr
    assert "*.none: no such file or folder" in result.stderr
    assert (out / "a.txt").read_bytes() == single(model_dir, inputs / "a.txt")
    assert (out / "b.txt").is_file()
    globbed = run("batch", str(inputs / "*.txt"), "-d", tmp_path / "g", "-m", model_dir, *FAST)
    assert globbed.exit_code == 0, globbed.stderr
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["a.txt", "b.txt", "odd.txt"]


def test_ray_engine_without_ray_says_how_to_install(model_dir, inputs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    result = run("batch", inputs / "a.txt", "-d", tmp_path / "out", "-m", model_dir,
                 "--engine", "ray")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "pip install -e '.[ray]'" in result.stderr


def test_the_batch_function_for_other_pipelines(model_dir):
    from core.batch import TranslateBatch

    translate = TranslateBatch(str(model_dir), device="cpu", strategy="greedy", max_length=6)
    lines = [TEXTS[0], "", TEXTS[2]]
    got = translate({"text": lines, "id": [1, 2, 3]})
    assert got["id"] == [1, 2, 3] and len(got["translation"]) == 3 and got["translation"][1] == ""
    assert got["translation"] == translate.translate(lines)
    pandas = pytest.importorskip("pandas")
    frame = translate(pandas.DataFrame({"text": lines}))
    assert list(frame["translation"]) == got["translation"]


# ---- on a local Ray cluster -----------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_batch_is_translate_i_per_file(ray_cluster, model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    result = run("batch", inputs, "-d", out, "--engine", "ray", "--workers", 2, "-m", model_dir,
                 *FAST)
    assert result.exit_code == 0, result.stderr
    outputs_match(model_dir, inputs, out)


def translating_actors() -> list[int]:
    """The pids of the Ray actors that translate (Ray titles them ray::MapWorker(...))."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes()
        except OSError:
            continue
        if text.startswith(b"ray::") and b"TranslateBatch" in text:
            found.append(int(cmdline.parent.name))
    return sorted(found)


@pytest.mark.slow
def test_a_ray_worker_killed_mid_job_loses_no_line(ray_cluster, tokenizer, inputs, tmp_path,
                                                   monkeypatch):
    slow = tiny_model(tokenizer.vocab_size, max_positions=512, final_logits_bias=True)
    with torch.no_grad():  # no sentence ends before its limit: the job takes a while
        slow.logits_bias[tokenizer.eos_id] = -1e4
    model = checkpoint.save(slow, tokenizer, tmp_path / "slow")
    flags = ["-s", "greedy", "--max-length", "40", "--max-length-factor", "0"]
    # what `translate -i` prints, taken first: once a worker has died, Ray's driver in this
    # process prints its notices on the stdout that the CLI runner captures
    want = {name: runner.invoke(app, ["-m", str(model), *flags, "-i", str(inputs / name)],
                                prog_name="translate").stdout.encode()
            for name in ("a.txt", "b.txt")}
    monkeypatch.setattr(batch, "ROWS_PER_CALL", 16)  # many small calls: one is cut short
    killed = []
    first_output = batch.writer

    def kill_one_then_write(writers, job):
        # The first translated lines are back, the rest are not: a worker is killed now,
        # mid-job, however fast this machine is (a timer missed the job on a fast one).
        if not killed:
            actors = translating_actors()
            assert actors, "no translating Ray actor found"
            os.kill(actors[0], 9)
            killed.append(actors[0])
        return first_output(writers, job)

    monkeypatch.setattr(batch, "writer", kill_one_then_write)
    out = tmp_path / "out"
    result = run("batch", inputs / "a.txt", inputs / "b.txt", "-d", out, "--engine", "ray",
                 "--workers", 2, "-m", model, *flags)
    assert killed, "no worker was killed"
    assert result.exit_code == 0, result.stderr
    for name in ("a.txt", "b.txt"):
        assert (out / name).read_bytes() == want[name], name
