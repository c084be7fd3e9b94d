"""The `translate` command: translates by default; subcommands models, download, train, eval.

torch is imported only inside the commands that need it, so `--help` stays instant."""

from __future__ import annotations

import atexit
import gc
import itertools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from typer.core import TyperCommand, TyperGroup

from cli import options as opt
from cli import views
from cli.batch import batch_command
from cli.console import BROKEN_PIPE, err, fail, report_invalid
from cli.engine import engine, make_router, settled
from cli.render import format_result, progress_bar, write_line
from cli.streams import check_output, count_lines, is_stdout, open_input, open_output
from core.machine import calm_threads_when_busy


class DefaultCommand(TyperCommand):
    """The translate command presents itself as `translate`, not `translate text`, and shows
    its options in groups."""

    SECTIONS = {"Input and output": ["input", "output", "fmt", "show", "layer"],
                "Model": ["source", "to", "via", "model", "revision", "device", "dtype", "batch_size",
                          "workers"],
                "Decoding": list(opt.FLAGS)}

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.parent.command_path, "[OPTIONS] [TEXT]...")

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record and param.param_type_name == "argument":
                record = (f"{param.metavar}...", record[1])  # not typer's <list[str]>
            if record:
                records[param.name] = record
        with formatter.section("Arguments"):
            formatter.write_dl([records.pop("text")])
        for title, names in self.SECTIONS.items():
            with formatter.section(title):
                formatter.write_dl([records.pop(n) for n in names if n in records])
        with formatter.section("Other options"):
            formatter.write_dl(list(records.values()))


class DefaultCommandGroup(TyperGroup):
    """Anything that is not a subcommand name goes to the default `text` command, so
    `translate "Hello"`, `translate -m DIR` and `translate models` all work; `translate help
    [COMMAND]` shows help. Parser errors are one line, as the tool's own errors, exit 2."""

    OWN = ("--version", "--install-completion", "--show-completion")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args[:1] == ["help"]:
            args = [args[1] if args[1:] and args[1] in self.commands else "text", "--help"]
        elif not args or (args[0] not in self.commands and args[0] not in self.OWN):
            args = ["text", *args]
        return super().parse_args(ctx, args)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            err().print("interrupted")
            sys.exit(130)
        except Exception as exc:  # click's UsageError (typer may vendor its own click)
            if getattr(exc, "exit_code", None) != 2 or not hasattr(exc, "format_message"):
                raise
            from core.segment import safe

            err().print(f"error: {safe(exc.format_message())} (see translate --help)")
            sys.exit(2)


app = typer.Typer(cls=DefaultCommandGroup, no_args_is_help=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]})


def show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"translate {version('translate')}")
        raise typer.Exit()


@app.callback()
def group(version: Annotated[bool, typer.Option(
        "--version", help="Show the version and exit.", is_eager=True,
        callback=show_version)] = False) -> None:
    """Translate text on the shell with a Transformer encoder-decoder."""


def warn_split(line: int, pieces: int) -> None:
    err().print(f"warning: line {line} is longer than the model reads at once; translated in "
              f"{pieces} pieces")


class Warnings:
    """Translation warnings on stderr, each naming its line: the first few, then a count, so
    a long file cannot flood the terminal (--format jsonl carries every one)."""

    SHOWN = 20

    def __init__(self):
        self.lines = 0

    def __call__(self, number: int, warnings: list[str]) -> None:
        if warnings:
            self.lines += 1
            if self.lines <= self.SHOWN:
                for warning in warnings:
                    err().print(f"warning: line {number}: {warning}")

    def close(self) -> None:
        if self.lines > self.SHOWN:
            err().print(f"warning: {self.lines - self.SHOWN} more lines had warnings "
                        "(--format jsonl lists them)")


@app.command("text", cls=DefaultCommand, epilog="Other commands: translate batch | models | "
                                                "download | train | eval  (see translate "
                                                "COMMAND --help)")
@opt.with_decoding()
@opt.with_model()
def translate_command(
    text: Annotated[Optional[list[str]], typer.Argument(
        help="Text to translate; without it, lines come from -i FILE or stdin.",
        show_default=False, metavar="TEXT")] = None,
    input: Annotated[Optional[Path], typer.Option(
        "--input", "-i", metavar="FILE", help="Translate the lines of FILE (- for stdin).")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="FILE", help="Write to FILE: a regular file is replaced only "
        "when complete; a FIFO or device is written as a stream; - is stdout.")] = None,
    batch_size: opt.BatchSize = 32,
    workers: opt.Workers = 1,
    fmt: Annotated[str, typer.Option("--format", metavar="[text|jsonl]",
                                     help="Output format.")] = "text",
    show: Annotated[Optional[str], typer.Option(
        "--show", metavar="confidence,attention", show_default=False,
        help="What the model thinks: words coloured by confidence on a terminal (jsonl: "
             "\"tokens\"); the cross-attention as a heat map on stderr (jsonl: "
             "\"alignment\").")] = None,
    layer: Annotated[int, typer.Option(
        metavar="N", help="The decoder layer whose attention --show attention draws; -1 is "
        "the last.")] = -1,
    debug: opt.Debug = False,
    chosen: dict = None,
    decoding: dict = None,
) -> None:
    """Translate text: an argument, lines piped in, or a file; one output line per input line.
    On a terminal with nothing to read, an interactive session."""
    with fail(debug):
        from core.errors import UsageError

        if fmt not in ("text", "jsonl"):
            raise UsageError(f"unknown format '{fmt}'; use text or jsonl")
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        opt.check_placement(chosen["device"], chosen["dtype"])
        check_output(output)  # before torch and the model load: a bad -o costs nothing
        flags, decoding = decoding, opt.decode_options(**decoding)  # bad flags fail early
        from cli.session import Session, Viewer, explain_line, parse_show, scores

        shown = parse_show(show)
        if not text and input is None and output is None and sys.stdin.isatty() \
                and sys.stdout.isatty():
            from rich.console import Console

            from core.userdir import state_root

            Session(lambda src, tgt: make_router(**{**chosen, "source": src, "to": tgt},
                                                 batch_size=batch_size),
                    chosen["to"], chosen["source"], flags, Console(highlight=False, soft_wrap=True),
                    state_root() / "history", show=shown, layer=layer).run()
            return
        invalid: list[int] = []
        with open_input(text, input, invalid.append) as lines:
            router = make_router(**chosen, batch_size=batch_size)
            decoding = router.translator(router.default[-1]).options(**flags)
            # token by token for text given as arguments; lines of a file or pipe are batched
            live = text and is_stdout(output) and sys.stdout.isatty() and fmt == "text"
            with open_output(output) as out, engine(router, flags, workers) as run:
                if live:
                    from rich.console import Console

                    if "confidence" in shown:
                        err().print(views.legend())
                    viewer = Viewer(router, flags, Console(highlight=False, soft_wrap=True),
                                    show=shown, layer=layer)
                    for line in lines:
                        viewer.line(line)
                else:
                    sources, queued = itertools.tee(lines)
                    results = run(queued, on_split=warn_split, ready=lines.ready)
                    screen = None  # alternatives as a table on a terminal
                    if decoding.n_best > 1 and fmt == "text" and is_stdout(output) \
                            and sys.stdout.isatty():
                        from rich.console import Console

                        screen = Console(highlight=False, soft_wrap=True)
                    total = count_lines(input) if input is not None else None
                    bar = sys.stderr.isatty() and not text
                    warn = Warnings()
                    with progress_bar(err, total, enabled=bar) as advance:
                        for number, (line, nbest) in enumerate(zip(sources, results), 1):
                            extra = None
                            if shown and line.strip():
                                route, _ = router.route(line)
                                found = explain_line(router, route, line, flags, layer)[2] \
                                    if route else []
                                extra = scores(found, shown) if fmt == "jsonl" else None
                                for e in found if "attention" in shown else []:
                                    err().print(views.heatmap(e, err().width))
                            if screen is not None:
                                screen.print(views.nbest_table(nbest))
                            else:
                                write_line(out, format_result(line, nbest, fmt,
                                                              decoding.n_best, extra))
                            warn(number, nbest[0].warnings)
                            advance()
                    warn.close()
        report_invalid(invalid)


app.command("batch")(batch_command)

models_app = typer.Typer(help="List the models -m accepts by name; remove cached ones.")
app.add_typer(models_app, name="models")
COLUMNS = ("name", "languages", "size", "precision", "where", "decoding", "path")


@models_app.callback(invoke_without_command=True)
def models_command(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list, every field.")] = False,
    debug: opt.Debug = False,
) -> None:
    """List the installed models: embedded ones, then converted Marian models in the cache. A
    table on a terminal; tab-separated lines with a header on a pipe; --json."""
    if ctx.invoked_subcommand is not None:
        return
    with fail(debug):
        import json

        from core.models import checkpoints_dir, installed

        found = installed()
        if not found:
            err().print(f"no models installed in {checkpoints_dir()}")
        if as_json:
            print(json.dumps([dict(vars(m), path=str(m.path)) for m in found], indent=2))
            return
        tty = sys.stdout.isatty()
        rows = [(m.name + (" (default)" if m.default and tty else ""), f"{m.source}->{m.target}",
                 f"{m.size_mb:.1f} MB", m.precision, m.where,
                 ", ".join(f"{k} {v}" for k, v in m.decoding.items()) or "greedy", str(m.path))
                for m in found]
        if tty:
            from rich.console import Console
            from rich.table import Table

            table = Table(*COLUMNS, highlight=False)
            for row in rows:
                table.add_row(*row)
            Console(markup=False, highlight=False).print(table)
        else:
            for row in [COLUMNS, *rows]:
                print("\t".join(row))


@models_app.command("remove")
def models_remove(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A cached model's name or path.",
                                        show_default=False)],
    debug: opt.Debug = False,
) -> None:
    """Delete a converted model from the cache (embedded models stay)."""
    with fail(debug):
        from core.models import remove

        err().print(f"removed {remove(name)}")


@app.command("download")
def download_command(
    repo: Annotated[str, typer.Argument(
        help="Hugging Face Hub id, e.g. Helsinki-NLP/opus-mt-en-fr.", metavar="ID",
        show_default=False)],
    revision: opt.Revision = None,
    debug: opt.Debug = False,
) -> None:
    """Fetch a Marian (opus-mt) model from the Hugging Face Hub and convert it for -m ID;
    prints the converted directory."""
    with fail(debug):
        from core import hub

        path = hub.download(repo, revision)
        err().print(f"{repo} is ready: translate -m {repo}"
                  + (f" --revision {revision}" if revision else ""))
        print(path)


@app.command("eval")
@opt.with_decoding(exclude=("n_best",))
@opt.with_model()
def eval_command(
    src: Annotated[Path, typer.Option(help="Source sentences, one per line.")],
    ref: Annotated[Path, typer.Option(help="Reference translations, line-aligned with --src.")],
    batch_size: opt.BatchSize = 64,
    workers: opt.Workers = 1,
    hyp: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Also write the translations to FILE.")] = None,
    lowercase: Annotated[bool, typer.Option(
        "--lowercase", "-lc", help="Case-insensitive BLEU.")] = False,
    debug: opt.Debug = False,
    chosen: dict = None,
    decoding: dict = None,
) -> None:
    """Translate --src and score it against --ref: sacreBLEU BLEU and chrF, and speed."""
    with fail(debug):
        import time

        import sacrebleu

        from core.data import read_lines
        from core.errors import DataError

        flags, decoding = decoding, opt.decode_options(**decoding)  # bad flags fail early
        opt.check_placement(chosen["device"], chosen["dtype"])
        check_output(hyp)  # before translating: a bad -o costs nothing
        sources, refs = read_lines(src), read_lines(ref)
        if len(sources) != len(refs):
            raise DataError(f"{src} has {len(sources)} lines but {ref} has {len(refs)}")
        router = make_router(**chosen, batch_size=batch_size,
                             detect=False)  # every line the same route: one thing measured
        translator = router.translator(router.default[-1])  # the model that writes the output
        decoding = translator.options(**flags)
        with engine(router, flags, workers) as run:
            start = time.perf_counter()
            hyps = [nbest[0].text for nbest in run(sources)]
            seconds = time.perf_counter() - start
        if hyp is not None:
            with open_output(hyp) as out:
                out.writelines(h + "\n" for h in hyps)
        bleu = sacrebleu.BLEU(lowercase=lowercase)
        chrf = sacrebleu.CHRF()
        bleu_score = bleu.corpus_score(hyps, [refs])
        chrf_score = chrf.corpus_score(hyps, [refs])
        n_tokens = sum(len(translator.tokenizer.encode(h)) - 1 for h in hyps)
        print(f"BLEU  {bleu_score.score:.2f}  {bleu.get_signature()}")
        print(f"chrF  {chrf_score.score:.2f}  {chrf.get_signature()}")
        print(f"speed {len(hyps) / seconds:.1f} sentences/s, {n_tokens / seconds:.0f} tokens/s "
              f"({len(hyps)} sentences in {seconds:.1f} s, {decoding.strategy})")


@app.command("train")
def train_command(
    train: Annotated[Optional[list[str]], typer.Option(
        "--train", help="Training corpus: a .tsv[.gz] of source<TAB>target, or a prefix P with "
                        "P.SRC and P.TGT files (plain or .gz). Repeat for several.")] = None,
    valid: Annotated[Optional[str], typer.Option(help="Validation corpus (same forms).")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Run directory.")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="TOML file of training settings; flags override it.")] = None,
    src_lang: Annotated[Optional[str], typer.Option(help="Source language code.")] = None,
    tgt_lang: Annotated[Optional[str], typer.Option(help="Target language code.")] = None,
    holdout: Annotated[Optional[int], typer.Option(
        help="Keep N pairs of the last corpus out of training (written to OUT/heldout.*).")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="Joint subword vocabulary size.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs to train.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop after this many minutes.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Tokens per batch per process.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Warm-up steps.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Torch threads per process.")] = None,
    debug: opt.Debug = False,
) -> None:
    """Train a model (and its tokenizer) on parallel text; resumes OUT if it holds a run.

    Runs on several processes under `torchrun --nproc-per-node N`."""
    with fail(debug):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        from core.train import TrainConfig, Trainer

        settled()

        flags = dict(train=train or None, valid=valid, out=out, src_lang=src_lang,
                     tgt_lang=tgt_lang, holdout=holdout, vocab_size=vocab_size, epochs=epochs,
                     max_minutes=max_minutes, max_tokens=max_tokens, lr=lr, warmup=warmup,
                     seed=seed, threads=threads)
        if config is not None:
            cfg = TrainConfig.from_file(config, **flags)
        else:
            cfg = TrainConfig(**{k: v for k, v in flags.items() if v is not None})
        cfg.check_files()  # before the progress display starts: an error stays one line
        progress = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("loss {task.fields[loss]:.3f}"),
                            TextColumn("{task.fields[tps]:,.0f} tok/s"), TimeRemainingColumn(),
                            console=err(), transient=True)
        with progress:
            Trainer(cfg, progress=progress).run()


def main() -> None:
    gc.disable()  # until start-up is over: cli.engine.settled()
    calm_threads_when_busy()  # before torch loads
    try:
        app()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
    # Everything is written and closed by now. Finish the exit handlers, then skip the
    # interpreter's teardown of torch's modules, which takes up to half a second.
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = BROKEN_PIPE
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


if __name__ == "__main__":
    main()
