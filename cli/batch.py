"""`translate batch`: many files, each to the same name in an output folder, on this machine
(the workers of the main command) or on a Ray cluster (Ray Data: files read, lines
translated by actors that load the model once each, outputs written here in order).

Every output is written to a temporary file beside it and renamed when complete, so an output
is the whole translation of its input or is not there at all. A file that cannot be read or
translated is reported by name; the others still complete."""

from __future__ import annotations

import glob
import io
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli import options as opt
from cli.console import err, fail, report_invalid
from cli.engine import engine, make_router
from cli.render import progress_bar
from cli.streams import Lines, count_lines, open_output

ROWS_PER_CALL = 256  # lines per Ray Data batch: an actor's share of work per call


@dataclass
class Job:
    source: Path
    dest: Path
    lines: int = 0
    invalid: list[int] = field(default_factory=list)  # lines with invalid UTF-8 replaced


def expand(inputs: list[str]) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(file, name in the output folder) for every file the inputs name, and the inputs that
    name none: a file keeps its name, a folder's files keep their paths below it, a quoted
    glob (`'logs/*.txt'`) is expanded here."""
    found, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            found += [(p, p.relative_to(path)) for p in files]
        elif path.exists() or not glob.has_magic(item):
            found.append((path, Path(path.name)))
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            found += [(m, Path(m.name)) for m in matches]
            if not matches:
                missing.append(item)
    return found, missing


def plan(inputs: list[str], output_dir: Path, force: bool) -> tuple[list[Job], list[str]]:
    """The jobs, and the problems of inputs that will be skipped (reported by name). Two
    inputs with one output name, or outputs that exist (without --force), are usage errors,
    found before any work."""
    from core.errors import UsageError

    pairs, missing = expand(inputs)
    problems = [f"{item}: no such file or folder" for item in missing]
    jobs: dict[Path, Job] = {}
    for source, name in pairs:
        dest = output_dir / name
        if dest in jobs:
            raise UsageError(f"{jobs[dest].source} and {source} would both be written to {dest}")
        if dest.resolve() == source.resolve():
            raise UsageError(f"{source} would be overwritten by its own translation; choose "
                             "another --output-dir")
        try:
            with open(source, "rb") as f:
                f.read(1)
        except OSError as exc:
            problems.append(f"{source}: {exc.strerror or exc}")
            continue
        jobs[dest] = Job(source, dest, count_lines(source) or 0)
    existing = [str(j.dest) for j in jobs.values() if j.dest.exists()]
    if existing and not force:
        shown = ", ".join(existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise UsageError(f"{len(existing)} output file(s) exist ({shown}); --force replaces them")
    return list(jobs.values()), problems


def run_local(jobs: list[Job], router, flags: dict, workers: int, advance) -> list[str]:
    problems = []
    with engine(router, flags, workers) as translate:
        for job in jobs:
            try:
                job.dest.parent.mkdir(parents=True, exist_ok=True)
                with open(job.source, "rb") as f, open_output(job.dest) as out:
                    for nbest in translate(Lines(f, job.invalid.append)):
                        out.write(nbest[0].text + "\n")
                        advance()
            except OSError as exc:
                problems.append(f"{job.source}: {exc.strerror or exc}")
    return problems


def split_file(row: dict) -> list[dict]:
    """A file read by Ray Data into its lines, as `translate -i` reads them."""
    invalid: list[int] = []
    lines = list(Lines(io.BytesIO(row["bytes"]), invalid.append))
    bad = set(invalid)
    return [{"path": row["path"], "n": n, "text": line, "invalid": n + 1 in bad}
            for n, line in enumerate(lines)]


def run_ray(jobs: list[Job], settings: dict, flags: dict, workers: int | None, gpus: float,
            advance) -> list[str]:
    from core.errors import UsageError

    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install -e '.[ray]'") from None
    from core.batch import TranslateBatch

    import logging

    for name in ("ray", "ray.data"):  # its progress talk would drown ours
        logging.getLogger(name).setLevel(logging.ERROR)
    ray.init(ignore_reinit_error=True, log_to_driver=False, logging_level=logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come back in input order
    context.enable_progress_bars = False  # ours counts lines
    actors = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    by_path = {str(j.source.resolve()): j for j in jobs}
    # reading reserves no CPU, so that N actors on N CPUs leave room for it (it is brief)
    ds = ray.data.read_binary_files(list(by_path), include_paths=True, num_cpus=0)
    ds = ds.flat_map(split_file, num_cpus=0).map_batches(
        TranslateBatch, fn_constructor_kwargs={**settings, **flags}, batch_size=ROWS_PER_CALL,
        # Ray Data restarts an actor that dies and does its batch again (its defaults:
        # max_restarts and max_task_retries -1), so no line is lost or doubled
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1 if not gpus else 0,
        num_gpus=gpus)
    writers: dict[Path, tuple[ExitStack, object]] = {}
    done: dict[Path, int] = {j.dest: 0 for j in jobs}
    pending: dict[Path, dict] = {j.dest: {} for j in jobs}

    def finish(job: Job) -> None:  # complete: renamed into place now
        stack, _ = writers.pop(job.dest)
        stack.close()

    try:
        for job in jobs:
            if job.lines == 0:  # an empty file gets an empty translation
                writer(writers, job)
                finish(job)
        for batch in ds.iter_batches(batch_size=ROWS_PER_CALL, batch_format="default"):
            for path, n, translation, invalid in zip(batch["path"], batch["n"],
                                                     batch["translation"], batch["invalid"]):
                job = by_path[_resolved(path, by_path)]
                out = writers[job.dest][1] if job.dest in writers else writer(writers, job)
                pending[job.dest][int(n)] = (str(translation), bool(invalid))
                while done[job.dest] in pending[job.dest]:  # in order, whatever came first
                    text, bad = pending[job.dest].pop(done[job.dest])
                    out.write(text + "\n")
                    done[job.dest] += 1
                    if bad:
                        job.invalid.append(done[job.dest])
                    advance()
                if done[job.dest] == job.lines:
                    finish(job)
    except Exception as exc:  # a task that failed for good: what is complete stays
        from core.errors import TranslateError

        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TranslateError(f"the Ray job failed ({first}); complete outputs are kept, "
                             "unfinished ones are not written") from None
    finally:
        for stack, _ in writers.values():  # unfinished: their temporary files removed
            stack.__exit__(RuntimeError, RuntimeError("unfinished"), None)
    return [f"{j.source}: {done[j.dest]} of {j.lines} lines came back" for j in jobs
            if done[j.dest] != j.lines]


def writer(writers: dict, job: Job):
    """The output of `job`, open (a temporary file until it is finished)."""
    stack = ExitStack()
    job.dest.parent.mkdir(parents=True, exist_ok=True)
    out = stack.enter_context(open_output(job.dest))
    writers[job.dest] = (stack, out)
    return out


def _resolved(path: str, by_path: dict) -> str:
    """Ray Data names a file as given or as resolved, depending on its filesystem."""
    return path if path in by_path else str(Path(path).resolve())


@opt.with_decoding(exclude=("n_best",))
@opt.with_model()
def batch_command(
    inputs: Annotated[list[str], typer.Argument(
        metavar="INPUT", help="Files, folders (every file below) or quoted globs.",
        show_default=False)],
    output_dir: Annotated[Path, typer.Option(
        "--output-dir", "-d", metavar="DIR", help="Where each translation goes, under its "
        "input's name (a folder's files keep their paths below it).", show_default=False)],
    engine_name: Annotated[str, typer.Option(
        "--engine", metavar="[local|ray]", help="This machine, or a Ray cluster (RAY_ADDRESS, "
        "else a local one).")] = "local",
    workers: Annotated[Optional[int], typer.Option(
        metavar="N", help="Processes (local) or Ray actors [default: 1 local; a Ray actor per "
        "CPU of the cluster].", show_default=False)] = None,
    gpus: Annotated[float, typer.Option(
        "--gpus-per-worker", metavar="X", help="GPUs per Ray actor (0: CPU actors).")] = 0.0,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace output files that exist.")] = False,
    batch_size: opt.BatchSize = 32,
    debug: opt.Debug = False,
    chosen: dict = None,
    decoding: dict = None,
) -> None:
    """Translate many files, each into --output-dir under its own name; N lines in, N out."""
    with fail(debug):
        from core.errors import DataError, UsageError

        if engine_name not in ("local", "ray"):
            raise UsageError(f"unknown engine '{engine_name}'; use local or ray")
        opt.check_placement(chosen["device"], chosen["dtype"])
        flags = decoding
        opt.decode_options(**flags)  # bad flags fail before any work
        jobs, problems = plan(inputs, output_dir, force)
        output_dir.mkdir(parents=True, exist_ok=True)
        total = sum(j.lines for j in jobs)
        with progress_bar(err, total, enabled=sys.stderr.isatty()) as advance:
            if engine_name == "local":
                router = make_router(**chosen, batch_size=batch_size)
                failed = run_local(jobs, router, flags, workers or 1, advance)
            else:
                settings = {**chosen, "batch_size": batch_size}
                failed = run_ray(jobs, settings, {k: v for k, v in flags.items()
                                                  if v is not None}, workers, gpus, advance)
        problems += failed
        for job in jobs:
            report_invalid(job.invalid, str(job.source))
        for problem in problems:
            err().print(f"error: {problem}")
        err().print(f"translated {len(jobs) - len(failed)} file(s), {total} lines, into "
                    f"{output_dir}")
        if problems:
            raise DataError(f"{len(problems)} input(s) failed (named above); the others are "
                            "complete")
