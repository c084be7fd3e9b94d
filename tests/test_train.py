"""Training: it learns, it resumes exactly, it runs data-parallel; eval scores with sacrebleu."""

import os
import re
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli.main import app
from core.train import TrainConfig, Trainer

PAIRS = [
    ("a man rides a bike", "ein mann fährt rad"),
    ("two dogs play", "zwei hunde spielen"),
    ("the child laughs", "das kind lacht"),
    ("a woman sings", "eine frau singt"),
    ("the dog runs", "der hund rennt"),
    ("two men work", "zwei männer arbeiten"),
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS), encoding="utf-8")
    return str(path)


def tiny(corpus, out, **overrides) -> TrainConfig:
    values = dict(train=[corpus], valid=corpus, out=str(out), vocab_size=300, d_model=32,
                  n_heads=4, d_ff=64, layers=1, dropout=0.1, attention_dropout=0.0, lr=3e-3,
                  warmup=10, max_tokens=24, epochs=2, average_last=2, threads=1)
    values.update(overrides)
    return TrainConfig(**values)


def test_learns_the_training_pairs(corpus, tmp_path):
    """A tiny model memorises six pairs: greedy output equals the references."""
    Trainer(tiny(corpus, tmp_path / "run", epochs=60, dropout=0.0, lr=1e-2,
                 max_tokens=200)).run()
    from core.translator import Translator

    translator = Translator.load(str(tmp_path / "run" / "final"), device="cpu")
    assert translator.translate([s for s, _ in PAIRS], max_length=40) == [t for _, t in PAIRS]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "valid BLEU 100.00" in log


def test_resume_continues_exactly(corpus, tmp_path):
    """Stopping after 2 epochs and resuming to 4 gives the weights of 4 epochs in one go."""
    Trainer(tiny(corpus, tmp_path / "straight", epochs=4)).run()
    Trainer(tiny(corpus, tmp_path / "resumed", epochs=2)).run()
    Trainer(tiny(corpus, tmp_path / "resumed", epochs=4)).run()
    assert "resumed from" in (tmp_path / "resumed" / "train.log").read_text()
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, world: int, port: int, corpus: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    trainer = Trainer(tiny(corpus, out, epochs=2))
    trainer.run()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()},
              f"{out}/rank{rank}.safetensors")
    torch.distributed.destroy_process_group()


def test_two_processes_end_with_identical_weights(corpus, tmp_path):
    """Under DDP (gloo, 2 CPU processes) gradients are all-reduced: both ranks agree, and
    they trained (weights moved from the shared initialisation)."""
    out = str(tmp_path / "ddp")
    mp.spawn(ddp_worker, args=(2, free_port(), corpus, out), nprocs=2, join=True)
    r0, r1 = load_file(f"{out}/rank0.safetensors"), load_file(f"{out}/rank1.safetensors")
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    from core.config import ModelConfig
    from core.model import Transformer

    torch.manual_seed(1)  # the trainer's seed: the weights both ranks started from
    start = Transformer(ModelConfig.load(tmp_path / "ddp" / "last" / "config.json")).state_dict()
    assert not torch.equal(start["decoder.0.ffn.fc1.weight"], r0["decoder.0.ffn.fc1.weight"])


def test_eval_prints_bleu_chrf_signature_and_speed(model_dir, tmp_path):
    src, ref = tmp_path / "src.en", tmp_path / "ref.de"
    src.write_text("A man.\nTwo dogs.\n")
    ref.write_text("Ein Mann.\nZwei Hunde.\n")
    result = CliRunner().invoke(app, ["eval", "-m", str(model_dir), "--src", str(src),
                                      "--ref", str(ref), "--max-length", "5", "-o",
                                      str(tmp_path / "hyp.de")])
    assert result.exit_code == 0, result.stderr
    assert re.search(r"^BLEU  \d+\.\d\d  nrefs:1\|case:mixed\|eff:no\|tok:13a", result.stdout, re.M)
    assert re.search(r"^chrF  \d+\.\d\d  nrefs:1\|case:mixed", result.stdout, re.M)
    assert "sentences/s" in result.stdout
    assert len((tmp_path / "hyp.de").read_text().splitlines()) == 2


def test_eval_misaligned_files_is_a_clear_error(model_dir, tmp_path):
    (tmp_path / "a").write_text("one\ntwo\n")
    (tmp_path / "b").write_text("eins\n")
    result = CliRunner().invoke(app, ["eval", "-m", str(model_dir), "--src", str(tmp_path / "a"),
                                      "--ref", str(tmp_path / "b")])
    assert result.exit_code == 6 and "2 lines" in result.stderr


@pytest.mark.parametrize("toml, message", [
    ('epochs = "x"', "epochs = 'x': expected int"),
    ("epochs = -1", "epochs must be at least 1"),
    ("dropout = 1.5", "dropout must be in [0, 1)"),
    ("d_model = 30\nn_heads = 4", "multiple of n_heads"),
    ('train = ["no/such/corpus.tsv"]', "no corpus file no/such/corpus.tsv"),
])
def test_bad_settings_fail_before_any_work(tmp_path, toml, message):
    config = tmp_path / "c.toml"
    config.write_text(toml + "\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "-c", str(config), "--out", str(out)])
    assert result.exit_code in (2, 6) and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (out / "tokenizer.json").exists()


def test_no_validation_set_is_a_warning_not_nan(corpus, tmp_path):
    Trainer(tiny(corpus, tmp_path / "run", valid="", epochs=1)).run()
    log = (tmp_path / "run" / "train.log").read_text()
    assert "warning: no validation set" in log and "nan" not in log
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_a_failure_in_validation_loses_no_step(corpus, tmp_path, monkeypatch):
    """The resumable state is written before validating: a run that dies there (it once did,
    an hour in) resumes from that step, not from the start."""
    cfg = tiny(corpus, tmp_path / "run", epochs=4, eval_every=5)

    def broken(self, model):
        raise RuntimeError("validation broke")

    monkeypatch.setattr(Trainer, "validate", broken)
    with pytest.raises(RuntimeError, match="validation broke"):
        Trainer(cfg).run()
    monkeypatch.undo()
    Trainer(cfg).run()
    assert "resumed from" in (log := (tmp_path / "run" / "train.log").read_text())
    assert "at step 5 " in log
