"""Teacher-forced training as in the paper, on one process or many (torchrun + DDP).

The decoder reads the target shifted right (BOS first) and predicts the next token; the loss is
label-smoothed cross-entropy over real tokens; Adam with warm-up then inverse-square-root decay.
A run directory holds the tokenizer, `last/` and `best/` checkpoints, recent snapshots for
averaging, `state.pt` for resuming, and `train.log`."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import sacrebleu
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from core import augment, checkpoint, clean, data
from core.config import ModelConfig
from core.errors import DataError, UsageError
from core.model import Transformer
from core.tokenizer import Tokenizer, train_tokenizer
# imported now, not at the first validation an hour in: by then the files may have changed
from core.translator import Translator


@dataclass(kw_only=True)
class TrainConfig:
    # corpora: TSV files or P with P.<src>, P.<tgt>; or tables {path, repeat, sample}
    train: list[str | dict] = field(default_factory=list)
    valid: str | list[str] = ""  # corpora for validation loss and BLEU (mean over them)
    valid_max: int = 0  # pairs read from each validation corpus (0: all)
    tsv_languages: list[str] = field(default_factory=list)  # languages of a TSV's 2 columns
    exclude: list[str] = field(default_factory=list)  # evaluation sets kept out of training
    clean: bool = False  # drop empty, duplicate, misaligned, wrong-language pairs (core.clean)
    augment: float = 0.0  # copy-through pairs added, as a fraction of the cleaned pairs
    init: str = ""  # checkpoint directory to start from: its shape, tokenizer and weights
    out: str = "run"  # run directory
    src_lang: str = "en"
    tgt_lang: str = "de"
    holdout: int = 0  # pairs of the last training corpus kept out, written to out/heldout.*
    vocab_size: int = 8000  # joint subword vocabulary
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    layers: int = 4  # encoder layers = decoder layers
    dropout: float = 0.3
    attention_dropout: float = 0.1
    activation: str = "relu"
    norm_first: bool = False
    label_smoothing: float = 0.1
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    warmup: int = 2000  # steps of linear warm-up; then lr decays as 1/sqrt(step)
    max_tokens: int = 4096  # padded tokens per batch (larger side), per process
    max_len: int = 128  # longer training pairs (in tokens) are skipped
    clip: float = 1.0  # gradient norm clipping
    epochs: int = 50
    max_minutes: float = 0.0  # stop after this much training time (0: no limit)
    eval_every: int = 0  # steps between validations (0: once per epoch)
    average_last: int = 5  # snapshots averaged into the final model
    bf16: bool = True  # bf16 autocast on CPU where supported
    seed: int = 1
    threads: int = 0  # torch threads per process (0: leave torch's default)

    @classmethod
    def from_file(cls, path: Path, **overrides) -> TrainConfig:
        try:
            values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"cannot read training config {path}: {exc}") from None
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UsageError(f"{path}: unknown setting(s) {', '.join(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self) -> None:
        """Every setting checked for type and range before any work (files: check_files)."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.type
            want = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(kind)
            if kind.startswith("list") or kind.startswith("str | list"):
                ok = isinstance(value, (list, str)) if kind.startswith("str |") else \
                    isinstance(value, list)
            else:
                ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
            if not ok:
                raise UsageError(f"training setting {f.name} = {value!r}: expected {kind}")

        def need(ok: bool, why: str) -> None:
            if not ok:
                raise UsageError(f"training setting {why}")

        for name in ("epochs", "warmup", "max_tokens", "max_len", "average_last", "vocab_size",
                     "d_model", "n_heads", "d_ff", "layers"):
            need(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("holdout", "max_minutes", "eval_every", "threads", "clip", "valid_max"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("dropout", "attention_dropout", "label_smoothing"):
            need(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.augment <= 1, f"augment must be in [0, 1], got {self.augment}")
        need(self.d_model % self.n_heads == 0,
             f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        for entry in self.train:
            if isinstance(entry, dict):
                need("path" in entry and set(entry) <= {"path", "repeat", "sample"},
                     f"train entry {entry}: use {{ path = ..., repeat = N, sample = N }}")
            else:
                need(isinstance(entry, str), f"train entry {entry!r}: a path or a table")

    def check_files(self) -> None:
        """Every corpus and the starting checkpoint exist (before any data is read)."""
        specs = [e["path"] if isinstance(e, dict) else e for e in self.train]
        specs += ([self.valid] if isinstance(self.valid, str) else self.valid) + self.exclude
        for spec in filter(None, specs):
            if spec.endswith((".tsv", ".tsv.gz")):
                if not Path(spec).is_file():
                    raise DataError(f"no corpus file {spec}")
            else:
                data.find_side(spec, self.src_lang)
                data.find_side(spec, self.tgt_lang)
        if self.init:
            for name in (checkpoint.CONFIG, checkpoint.WEIGHTS, checkpoint.TOKENIZER):
                if not (Path(self.init) / name).is_file():
                    raise DataError(f"init = {self.init}: no {name} there")


def lr_factor(step: int, warmup: int) -> float:
    """The paper's schedule normalised to peak 1: linear warm-up, then 1/sqrt(step)."""
    step = max(step, 1)
    return min(step / warmup, math.sqrt(warmup / step))


def init_distributed() -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE set), join the process group: nccl on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


class Trainer:
    def __init__(self, cfg: TrainConfig, *, progress=None):
        self.cfg = cfg
        self.rank, self.world = init_distributed()
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                                   if torch.cuda.is_available() else "cpu")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.log_file = (self.out / "train.log").open("a", encoding="utf-8") if self.rank == 0 else None

    def log(self, message: str) -> None:
        if self.rank != 0:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.log_file.write(f"{stamp} {message}\n")
        self.log_file.flush()
        if self.progress is not None:
            self.progress.console.print(message, highlight=False, markup=False)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ---- data ---------------------------------------------------------------------------

    def read(self, spec: str) -> list[tuple[str, str]]:
        cfg = self.cfg
        return data.read_corpus(spec, cfg.src_lang, cfg.tgt_lang, cfg.tsv_languages or None)

    def load_data(self) -> None:
        cfg = self.cfg
        if not cfg.train:
            raise UsageError("no training corpus given (--train)")
        entries = [e if isinstance(e, dict) else {"path": e} for e in cfg.train]
        corpora = []
        for e in entries:
            corpus = self.read(e["path"])
            if e.get("sample", 0) and e["sample"] < len(corpus):
                corpus = random.Random(cfg.seed).sample(corpus, e["sample"])
            corpora.append(corpus)
        if cfg.holdout:
            corpora[-1], held = data.hold_out(corpora[-1], cfg.holdout, cfg.seed)
            if self.rank == 0:
                data.write_pairs(held, self.out / "heldout", cfg.src_lang, cfg.tgt_lang)
        if cfg.clean:
            corpora = self.clean(entries, corpora)
        pairs = [p for e, corpus in zip(entries, corpora) for p in corpus * e.get("repeat", 1)
                 if p[0] and p[1]]
        if cfg.augment:
            extra = augment.augment([p for c in corpora for p in c],
                                    int(cfg.augment * sum(map(len, corpora))), cfg.seed)
            self.log(f"{len(extra):,} copy-through pairs added (core.augment)")
            pairs += extra
        valid_specs = [cfg.valid] if isinstance(cfg.valid, str) else cfg.valid
        self.valid = {spec: self.read(spec)[: cfg.valid_max or None]
                      for spec in valid_specs if spec}
        tok_path = self.out / checkpoint.TOKENIZER
        if self.rank == 0 and not tok_path.exists():
            if cfg.init:
                shutil.copy(Path(cfg.init) / checkpoint.TOKENIZER, tok_path)
            else:
                train_tokenizer(data.iter_texts(pairs), cfg.vocab_size).save(tok_path)
        self.barrier()
        self.tokenizer = Tokenizer.load(tok_path)
        self.examples = self.encode(pairs)
        if not self.examples:
            raise DataError("no training pairs left after length filtering")
        self.valid_examples = self.encode([p for v in self.valid.values() for p in v])
        self.log(f"{len(pairs):,} training pairs, {len(self.examples):,} within {cfg.max_len} "
                 f"tokens; {sum(map(len, self.valid.values())):,} validation pairs; vocabulary "
                 f"{self.tokenizer.vocab_size:,}")

    def clean(self, entries: list[dict], corpora: list[list[tuple[str, str]]]):
        """core.clean on each corpus in turn, duplicates dropped across corpora too."""
        cfg = self.cfg
        exclude = clean.exclusion_keys(self.read(spec) for spec in cfg.exclude)
        check, seen, result = clean.LanguageCheck(), set(), []
        for e, corpus in zip(entries, corpora):
            kept, dropped = clean.clean(corpus, cfg.src_lang, cfg.tgt_lang, exclude=exclude,
                                        language=check, seen=seen)
            result.append(kept)
            why = ", ".join(f"{n:,} {reason}" for reason, n in dropped.most_common()) or "none"
            self.log(f"{e['path']}: {len(kept):,} of {len(corpus):,} pairs kept; dropped: {why}")
        return result

    def encode(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        src = self.tokenizer.encode_batch([s for s, _ in pairs])  # ids + EOS
        tgt = self.tokenizer.encode_batch([t for _, t in pairs])
        return [(s, t) for s, t in zip(src, tgt)
                if len(s) <= self.cfg.max_len and len(t) < self.cfg.max_len]

    def collate(self, batch: list[tuple[list[int], list[int]]]):
        pad, bos = self.tokenizer.pad_id, self.tokenizer.bos_id
        S, T = max(len(s) for s, _ in batch), max(len(t) for _, t in batch)
        src = torch.full((len(batch), S), pad, dtype=torch.long)
        tgt_in = torch.full((len(batch), T), pad, dtype=torch.long)
        tgt_out = torch.full((len(batch), T), pad, dtype=torch.long)
        for i, (s, t) in enumerate(batch):
            src[i, : len(s)] = torch.tensor(s)
            tgt_in[i, : len(t)] = torch.tensor([bos] + t[:-1])  # shifted right
            tgt_out[i, : len(t)] = torch.tensor(t)  # ends with EOS
        to = lambda x: x.to(self.device, non_blocking=True)  # noqa: E731
        return to(src), to(src != pad), to(tgt_in), to(tgt_out)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        lengths = [(len(s), len(t)) for s, t in self.examples]
        batches = data.token_batches(lengths, self.cfg.max_tokens, self.cfg.seed + epoch)
        per_rank = len(batches) // self.world  # every rank takes the same number of steps
        return batches[self.rank: per_rank * self.world: self.world]

    # ---- model --------------------------------------------------------------------------

    def build(self) -> None:
        cfg, tok = self.cfg, self.tokenizer
        if cfg.init:  # the starting model's shape; this run's languages and dropout
            self.model_config = dataclasses.replace(
                ModelConfig.load(Path(cfg.init) / checkpoint.CONFIG), dropout=cfg.dropout,
                attention_dropout=cfg.attention_dropout, source_lang=cfg.src_lang,
                target_lang=cfg.tgt_lang)
        else:
            self.model_config = ModelConfig(
                vocab_size=tok.vocab_size, d_model=cfg.d_model, n_heads=cfg.n_heads, d_ff=cfg.d_ff,
                n_encoder_layers=cfg.layers, n_decoder_layers=cfg.layers, dropout=cfg.dropout,
                attention_dropout=cfg.attention_dropout, activation=cfg.activation,
                norm_first=cfg.norm_first, max_positions=max(512, cfg.max_len + 1),
                pad_id=tok.pad_id, unk_id=tok.unk_id, bos_id=tok.bos_id, eos_id=tok.eos_id,
                decoder_start_id=tok.bos_id, source_lang=cfg.src_lang, target_lang=cfg.tgt_lang)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = Transformer(self.model_config).to(self.device)
        if cfg.init:  # resume() still wins: state.pt holds the weights reached since
            self.model.load_state_dict(load_file(str(Path(cfg.init) / checkpoint.WEIGHTS)))
        # buffers (the sinusoid table) are constants: nothing to broadcast
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model, forward_sync_buffers=False)
                    if self.world > 1 else self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr,
                                          betas=(0.9, 0.98), eps=1e-9)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step + 1, cfg.warmup))
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_bleu, self.elapsed = -1.0, 0.0
        self.snapshots: list[str] = []

    def save_state(self) -> None:
        """Everything needed to resume, written atomically (tensors and plain values only)."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "step": self.step,
                 "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "best_bleu": self.best_bleu, "elapsed": self.elapsed,
                 "snapshots": self.snapshots, "rng": torch.get_rng_state()}
        tmp = self.out / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.out / "state.pt")

    def resume(self) -> bool:
        path = self.out / "state.pt"
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)  # no pickled code
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name in ("step", "epoch", "batch_in_epoch", "best_bleu", "elapsed", "snapshots"):
            setattr(self, name, state[name])
        torch.set_rng_state(state["rng"].cpu())
        self.log(f"resumed from {path} at step {self.step} (epoch {self.epoch + 1}, "
                 f"batch {self.batch_in_epoch})")
        return True

    # ---- training -----------------------------------------------------------------------

    def loss(self, model, src, src_mask, tgt_in, tgt_out, smoothing: float):
        use_bf16 = self.cfg.bf16 and self.device.type == "cpu"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(src, src_mask, tgt_in)  # (B, T, V)
        n_tokens = (tgt_out != self.tokenizer.pad_id).sum()
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt_out.flatten(),
                               ignore_index=self.tokenizer.pad_id, label_smoothing=smoothing,
                               reduction="sum")
        return loss / n_tokens, n_tokens

    def run(self) -> Path:
        cfg = self.cfg
        cfg.check_files()
        self.load_data()
        if not self.valid_examples:
            self.log("warning: no validation set (--valid): validation is skipped, and the "
                     "final model is the average of the last snapshots")
        self.build()
        self.resume()
        start = time.time() - self.elapsed
        done = False
        while self.epoch < cfg.epochs and not done:
            batches = self.epoch_batches(self.epoch)
            task = self.progress_task(len(batches))
            self.model.train()
            seen_tokens, t0 = 0, time.time()
            for i in range(self.batch_in_epoch, len(batches)):
                batch = self.collate([self.examples[j] for j in batches[i]])
                loss, n_tokens = self.loss(self.ddp, *batch, cfg.label_smoothing)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
                self.optimizer.step()
                self.scheduler.step()
                self.step, self.batch_in_epoch = self.step + 1, i + 1
                seen_tokens += int(n_tokens) + int(batch[1].sum())
                self.elapsed = time.time() - start
                if task is not None:
                    self.progress.update(task, advance=1, loss=loss.item(),
                                         tps=seen_tokens * self.world / (time.time() - t0))
                out_of_time = cfg.max_minutes and self.elapsed >= cfg.max_minutes * 60
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or out_of_time:
                    self.checkpoint(f"step {self.step} loss {loss.item():.3f}")
                    self.model.train()
                if out_of_time:
                    self.log(f"time limit of {cfg.max_minutes} minutes reached")
                    done = True
                    break
            if task is not None:
                self.progress.remove_task(task)
            if not done:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                if not cfg.eval_every:
                    self.checkpoint(f"epoch {self.epoch} done")
        if self.rank == 0:
            self.finish()
        self.barrier()
        return self.out / "final"

    def progress_task(self, total: int):
        if self.progress is None or self.rank != 0:
            return None
        return self.progress.add_task(f"epoch {self.epoch + 1}/{self.cfg.epochs}", total=total,
                                      completed=self.batch_in_epoch, loss=float("nan"), tps=0.0)

    def checkpoint(self, what: str) -> None:
        """Save the resumable state, validate, save last/best and a snapshot, and the state
        again (rank 0). The state comes first so that a failure in validation loses no step."""
        if self.rank == 0:
            self.save_state()
            val_loss, bleu, per_set = self.validate(self.model)
            checkpoint.save(self.model, self.tokenizer, self.out / "last")
            snap = f"snapshots/step{self.step}.safetensors"
            (self.out / "snapshots").mkdir(exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                      str(self.out / snap))
            self.snapshots.append(snap)
            for old in self.snapshots[: -self.cfg.average_last]:
                (self.out / old).unlink(missing_ok=True)
            self.snapshots = self.snapshots[-self.cfg.average_last:]
            if bleu > self.best_bleu:
                self.best_bleu = bleu
                shutil.copytree(self.out / "last", self.out / "best", dirs_exist_ok=True)
            self.save_state()
            scores = (f", valid loss {val_loss:.3f}, valid BLEU {bleu:.2f} "
                      f"(best {self.best_bleu:.2f}){per_set}") if self.valid_examples else ""
            self.log(f"{what}: step {self.step}, {self.elapsed / 60:.1f} min, "
                     f"lr {self.scheduler.get_last_lr()[0]:.2e}{scores}")
        self.barrier()

    def validate(self, model: Transformer) -> tuple[float, float, str]:
        """Loss over every validation pair; greedy BLEU, the mean over the validation sets;
        and each set's BLEU as text for the log when there are several."""
        if not self.valid_examples:
            return float("nan"), float("nan"), ""
        model.eval()
        total, count = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(self.valid_examples), 64):
                batch = self.collate(self.valid_examples[start: start + 64])
                loss, n = self.loss(model, *batch, 0.0)  # never the DDP wrapper: rank 0 alone
                total, count = total + loss.item() * int(n), count + int(n)
        translator = Translator(model, self.tokenizer, batch_size=64)
        scores = {}
        for name, pairs in self.valid.items():
            hyps = translator.translate([s for s, _ in pairs], strategy="greedy", max_length=160)
            scores[name] = sacrebleu.corpus_bleu(hyps, [[t for _, t in pairs]]).score
        per_set = "".join(f"; {Path(n).name} {b:.2f}" for n, b in scores.items()) \
            if len(scores) > 1 else ""
        return total / count, sum(scores.values()) / len(scores), per_set

    def finish(self) -> None:
        """Average the last snapshots; ship whichever of best and averaged validates better."""
        final = self.out / "final"
        candidates = [("best", self.out / "best")] if (self.out / "best").exists() else []
        if len(self.snapshots) > 1:
            states = [load_file(str(self.out / s)) for s in self.snapshots]
            avg = {k: sum(s[k].float() for s in states) / len(states) for k in states[0]}
            model = Transformer(self.model_config)
            model.load_state_dict(avg)
            _, bleu, per_set = self.validate(model)
            self.log(f"average of the last {len(states)} snapshots: valid BLEU {bleu:.2f}{per_set}")
            checkpoint.save(model, self.tokenizer, self.out / "averaged")
            if bleu > self.best_bleu or not candidates:
                candidates = [("averaged", self.out / "averaged")]
        if not candidates and (self.out / "last").exists():  # one snapshot, no validation
            candidates = [("last", self.out / "last")]
        if candidates:
            name, path = candidates[0]
            shutil.copytree(path, final, dirs_exist_ok=True)
            self.log(f"final model ({name}) written to {final}")
