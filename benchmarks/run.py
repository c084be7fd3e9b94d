"""The one benchmark command: build the model if needed, run every engine and precision on
every workload (each in its own process; a workload's engines loaded side by side and their
timed passes taken in turn), time the CLI, and print one markdown report to paste into
benchmarks/README.md. Progress goes to stderr; the raw results go to
benchmarks/.work/results.json.

    python -m benchmarks.run [--repeats N] [--only ENGINES] [--no-cli] [--bleu]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

from benchmarks.engines import MODES, THREADS, default_repeats
from benchmarks.workloads import NEW_TOKENS, RESULTS, WORKLOADS
from core.machine import cpu_flags, cpu_name

ROOT = Path(__file__).resolve().parent.parent
TRANSLATE = Path(sys.executable).parent / "translate"  # the CLI of this environment
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"
SENTENCE = "A man is riding a bicycle."
CLI_REPEATS = 5
RUN_TIMEOUT_S = 3600
# after each pass: CTranslate2's OpenMP threads spin for 200 ms after their work (Intel's
# KMP_BLOCKTIME) and would take the CPUs from the next engine's pass
PAUSE_S = 0.5
BASELINES = [("transformers", "float32"), ("ct2", "float32")]  # what our ratios compare to
ISA_FLAGS = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---- what runs ---------------------------------------------------------------------------

def selected(only: str | None) -> list[tuple[str, str]]:
    """(engine, mode) pairs in table order; --only takes engines or engine:mode, by commas."""
    pairs = [(engine, mode) for engine in ("transformers", "ct2", "ours")
             for mode in MODES[engine]]
    if not only:
        return pairs
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in wanted
               if not any(w in (engine, f"{engine}:{mode}") for engine, mode in pairs)]
    if unknown:
        sys.exit(f"--only: unknown {', '.join(unknown)}; choose from "
                 f"{', '.join(MODES)} or ENGINE:MODE")
    return [(e, m) for e, m in pairs if e in wanted or f"{e}:{m}" in wanted]


class Served:
    """One engine's process for one workload (benchmarks.engines --serve): loaded once, then
    asked for one timed pass at a time; killed if it runs past RUN_TIMEOUT_S in all."""

    def __init__(self, engine: str, mode: str, workload: str):
        self.engine, self.mode, self.workload = engine, mode, workload
        self.stderr = tempfile.TemporaryFile("w+")  # read back only for a failure's last line
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.engines", engine, mode, workload, "--serve"],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            text=True)
        self.timer = threading.Timer(RUN_TIMEOUT_S, self.kill)
        self.timer.start()
        self.error: str | None = None
        self.reply()  # {"ready": true} once loaded and warmed up

    def kill(self) -> None:
        self.error = f"timed out after {RUN_TIMEOUT_S} s"
        self.process.kill()

    def reply(self) -> dict:
        """The process's next line, or {} if it ended (self.error then says how)."""
        line = self.process.stdout.readline() if self.error is None else ""
        if line:
            return json.loads(line)
        self.process.wait()
        self.timer.cancel()
        if self.error is None:
            self.stderr.seek(0)
            tail = (self.stderr.read().strip().splitlines() or ["no output"])[-1]
            self.error = f"exit {self.process.returncode}: {tail}"
        return {}

    def timed_pass(self) -> dict:
        try:
            self.process.stdin.write("pass\n")
            self.process.stdin.flush()
        except BrokenPipeError:  # it ended: reply() says how
            pass
        return self.reply()

    def finish(self) -> dict:
        """The engine's summary line (engines.main's), or a failed one."""
        summary = {}
        if self.error is None:
            self.process.stdin.close()
            summary = self.reply()
            self.process.wait()
            self.timer.cancel()
        self.stderr.close()
        return summary or {"engine": self.engine, "mode": self.mode, "workload": self.workload,
                           "tokens_ok": False, "error": self.error}


def run_row(pairs: list[tuple[str, str]], workload: str, repeats: int) -> list[dict]:
    """Every engine's runs of one workload, interleaved: all loaded side by side (one after
    another), then `repeats` rounds of one timed pass each, the order turning every round.
    A host shared with other machines has slow spells of seconds to minutes; taken in turn,
    every engine of the row sees the same ones, where one engine after another would not."""
    served = []
    for engine, mode in pairs:
        log(f"    loading {engine} {mode} ...")
        served.append(Served(engine, mode, workload))
    for round_ in range(repeats):
        turn = round_ % len(served)
        for one in served[turn:] + served[:turn]:
            if one.error is None:
                one.timed_pass()
                time.sleep(PAUSE_S)
    return [one.finish() for one in served]


def median_wall(command: list[str]) -> dict:
    """Median wall time of CLI_REPEATS runs, after one untimed run that warms the file cache."""
    times = []
    for i in range(CLI_REPEATS + 1):
        start = time.perf_counter()
        done = subprocess.run(command, check=False, cwd=ROOT, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"exit {done.returncode}: {tail}"}
        if i:
            times.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(times), 3), "times_s": [round(t, 3) for t in times]}


def cli_timings() -> dict[str, dict]:
    commands = {"translate --help": [str(TRANSLATE), "--help"],
                'python -c "import torch"': [sys.executable, "-c", "import torch"],
                f'translate "{SENTENCE}"': [str(TRANSLATE), SENTENCE]}
    results = {}
    for label, command in commands.items():
        log(f"CLI: {label} x{CLI_REPEATS} ...")
        results[label] = median_wall(command)
    return results


def bleu_scores() -> dict[str, dict]:
    """`translate eval` on Multi30k test2016 with the default model, float32 against int8."""
    src, ref = (MULTI30K / f"test_2016_flickr.{lang}.gz" for lang in ("en", "de"))
    scores = {}
    for dtype in ("float32", "int8"):
        log(f"BLEU: translate eval --dtype {dtype} ...")
        done = subprocess.run([str(TRANSLATE), "eval", "--src", str(src), "--ref", str(ref),
                               "--dtype", dtype, "--device", "cpu"],
                              check=False, cwd=ROOT, capture_output=True, text=True)
        bleu = re.search(r"^BLEU\s+([\d.]+)", done.stdout, re.MULTILINE)
        speed = re.search(r"^speed (.*)$", done.stdout, re.MULTILINE)
        if done.returncode != 0 or not bleu:
            tail = (done.stderr.strip().splitlines() or ["no BLEU in the output"])[-1]
            scores[dtype] = {"error": f"exit {done.returncode}: {tail}"}
        else:
            scores[dtype] = {"bleu": float(bleu[1]), "speed": speed[1] if speed else ""}
    return scores


# ---- where it ran ------------------------------------------------------------------------

def cpu_idle_percent(seconds: float = 1.0) -> float:
    """How idle the CPUs were over `seconds`: other load (even niced) skews every number."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return 100.0 * (idle1 - idle0) / max(total1 - total0, 1)


def environment() -> dict:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    have = cpu_flags()
    commit = subprocess.run(["git", "describe", "--always", "--dirty"],
                            check=False, cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
        "python": platform.python_version(),
        "torch": version("torch"), "transformers": version("transformers"),
        "ctranslate2": version("ctranslate2"),
        "cpu": cpu_name(),  # with family and model: VMs often say only "AMD EPYC"
        "cpu_flags": [f for f in ISA_FLAGS if f in have],
        "cores": os.cpu_count(), "threads": THREADS,
        "idle_before_start_percent": round(cpu_idle_percent(), 1),
    }


# ---- the report --------------------------------------------------------------------------

def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def report(env: dict, pairs: list[tuple[str, str]], runs: list[dict], cli: dict | None,
           bleu: dict | None) -> str:
    by = {(r["engine"], r["mode"], r["workload"]): r for r in runs}
    names = [f"{e} {m}" for e, m in pairs]

    def speed(key) -> str:
        r = by.get(key)
        if r is None:
            return "-"
        if "error" in r:
            return "**FAILED**"
        text = f"{r['tok_s']:.1f}"
        return text if r["tokens_ok"] else f"**{text} ⚠ WRONG TOKEN COUNT**"

    flags = " ".join(env["cpu_flags"]) or "no AVX2"
    out = [f"Benchmark of {env['date']}, commit {env['commit']}", "",
           (f"- Python {env['python']}, torch {env['torch']}, transformers "
            f"{env['transformers']}, CTranslate2 {env['ctranslate2']}"),
           (f"- CPU: {env['cpu']} ({env['cores']} cores; {flags}); {env['threads']} threads "
            f"per engine; CPUs {env['idle_before_start_percent']:.0f}% idle before the start"),
           (f"- {NEW_TOKENS} output tokens per sentence; one warm-up pass, then the median of "
            "the timed passes, taken in turn with the other engines of the workload"), ""]
    bad = [r for r in runs if "error" in r or not r["tokens_ok"]]
    if bad:
        listed = ", ".join(f"{r['engine']} {r['mode']} {r['workload']} "
                           f"({r.get('error', f'not {NEW_TOKENS} tokens per sentence')})"
                           for r in bad)
        out += [f"**WARNING: {listed}**", ""]
    if env["idle_before_start_percent"] < 90:
        out += ["**WARNING: the CPUs were busy before the start; these numbers are unreliable.**",
                ""]

    out += ["Output tokens/s (higher is better):", ""]
    out += table(["workload", *names],
                 [[f"{w.name}: {w.about}", *(speed((e, m, w.name)) for e, m in pairs)]
                  for w in WORKLOADS.values()])

    ours = [(e, m) for e, m in pairs if e == "ours"]
    if ours:
        def ratio(mode: str, workload: str) -> str:
            mine = by.get(("ours", mode, workload))
            parts = []
            for base in BASELINES:
                other = by.get((*base, workload))
                good = all(r and "error" not in r and r["tokens_ok"] for r in (mine, other))
                parts.append(f"{mine['tok_s'] / other['tok_s']:.2f}x" if good else "n/a")
            return " / ".join(parts)

        out += ["", "Ours as a multiple of transformers float32 / CTranslate2 float32:", ""]
        out += table(["workload", *(f"ours {m}" for _, m in ours)],
                     [[w.name, *(ratio(m, w.name) for _, m in ours)]
                      for w in WORKLOADS.values()])

    def memory_row(engine: str, mode: str) -> list[str]:
        found = [by.get((engine, mode, w)) for w in WORKLOADS]
        loads = [r["load_s"] for r in found if r and "error" not in r]
        rss = [f"{r['peak_rss_mb']:.0f}" if r and "error" not in r else "-" for r in found]
        return [f"{engine} {mode}", f"{statistics.median(loads):.2f}" if loads else "-", *rss]

    out += ["", "Load time (s, median of the runs) and peak RSS (MB) of each run's process "
            "(-w2: the peak of its processes' summed PSS, sampled every 250 ms during its "
            "untimed passes):", ""]
    out += table(["engine", "load s", *(f"RSS {w}" for w in WORKLOADS)],
                 [memory_row(e, m) for e, m in pairs])

    if cli:
        title = (f"CLI wall time (median of {CLI_REPEATS}, default model, threads as the CLI "
                 "chooses):")
        out += ["", title, ""]
        out += table(["command", "seconds"],
                     [[f"`{label}`", f"{r['median_s']:.2f}" if "median_s" in r
                       else f"**FAILED** ({r['error']})"] for label, r in cli.items()])
    if bleu:
        ok = all("bleu" in s for s in bleu.values())
        out += ["", "BLEU of the default model on Multi30k test2016 (`translate eval`):", ""]
        out += table(["dtype", "BLEU", "speed"],
                     [[dtype, f"{s['bleu']:.2f}" if "bleu" in s else "**FAILED**",
                       s.get("speed", s.get("error", ""))] for dtype, s in bleu.items()])
        if ok:
            change = bleu["int8"]["bleu"] - bleu["float32"]["bleu"]
            out += ["", f"int8 - float32: {change:+.2f} BLEU"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, help="timed passes per run [default: 5 for "
                        "W1/W2, 3 for W3/W4]")
    parser.add_argument("--only", metavar="ENGINES", help="comma-separated engines "
                        f"({', '.join(MODES)}) or ENGINE:MODE")
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI timings")
    parser.add_argument("--bleu", action="store_true", help="also compare float32 and int8 "
                        "BLEU of the default model on Multi30k (slow)")
    args = parser.parse_args(argv)
    pairs = selected(args.only)

    from benchmarks import model
    model.build()

    env = environment()
    if env["idle_before_start_percent"] < 90:
        log(f"warning: the CPUs are only {env['idle_before_start_percent']:.0f}% idle; other "
            "processes will skew the numbers")
    runs = []
    # workload by workload, each a row of the tables: its engines' passes are interleaved
    for workload, w in WORKLOADS.items():
        row = [(e, m) for e, m in pairs if not (m.endswith("-w2") and w.sentences == 1)]
        # (workers share out batches; one sentence has none to share)
        repeats = args.repeats or default_repeats(w)
        log(f"{workload}: {len(row)} engines, {repeats} passes each, in turn ...")
        for result in run_row(row, workload, repeats):
            runs.append(result)
            name = f"{result['engine']} {result['mode']} {workload}"
            if "error" in result:
                log(f"    {name} FAILED: {result['error']}")
            else:
                log(f"    {name}: {result['tok_s']:.1f} tok/s, {result['peak_rss_mb']:.0f} MB, "
                    f"load {result['load_s']:.2f} s" + ("" if result["tokens_ok"] else
                                                       "  WRONG TOKEN COUNT"))
    cli = None if args.no_cli else cli_timings()
    bleu = bleu_scores() if args.bleu else None

    RESULTS.write_text(json.dumps({"environment": env, "runs": runs, "cli": cli, "bleu": bleu},
                                  indent=2) + "\n")
    log(f"raw results in {RESULTS}")
    print(report(env, pairs, runs, cli, bleu))


if __name__ == "__main__":
    main()
