"""The options of the commands that translate, declared once: the model and where it runs
(translate, eval, batch), and the decoding flags, added to every command that decodes, with
the rules that combine them into DecodeOptions."""

from __future__ import annotations

import functools
import inspect
import re
import typing
from typing import Annotated, Optional

import typer

from core.errors import UsageError

Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", metavar="NAME|DIR|ID",
    help="Embedded model name (en-de, de-en), checkpoint directory, Marian directory (Hugging "
         "Face layout), or Hugging Face Hub id OWNER/NAME [default: en-de].")]
Revision = Annotated[Optional[str], typer.Option(
    metavar="REV", help="Branch, tag or commit of a Hub model [default: main].",
    show_default=False)]
From = Annotated[Optional[str], typer.Option(
    "--from", "-f", metavar="LANG", show_default=False,
    help="Source language (de, deu, ...): with --to, picks the model for the pair (installed, "
         "through English, or from the Hub) unless -m.")]
To = Annotated[Optional[str], typer.Option(
    "--to", "-t", metavar="LANG", show_default=False,
    help="Target language: picks the model into it unless -m; with a multilingual "
         "model, its target (adds >>fra<< for fra).")]
Via = Annotated[Optional[str], typer.Option(
    "--via", metavar="LANG", show_default=False,
    help="Translate through LANG with two models (needs --to) [default: through en when no "
         "model for the pair is installed].")]
Device = Annotated[str, typer.Option(metavar="[auto|cpu|cuda]", help="Where to run.")]
BatchSize = Annotated[int, typer.Option(metavar="N", help="Sentences decoded together.")]
Workers = Annotated[int, typer.Option(
    metavar="N", help="Processes translating side by side, one thread each, sharing the model "
    "(for throughput on files and pipes).")]
Dtype = Annotated[str, typer.Option(
    metavar="[float32|bfloat16|float16|int8]",
    help="Precision; int8 (quantized linear layers) is the fastest on a CPU, float16 (half "
         "the weight bytes, float32 arithmetic; CPU only) next.")]


def flag(kind, *names: str, help: str, metavar: str = "N"):
    return Annotated[Optional[kind], typer.Option(*names, help=help, show_default=False,
                                                  metavar=metavar)]


# name -> annotation; None means "not given", so DecodeOptions' defaults apply
FLAGS = {
    "strategy": flag(str, "--strategy", "-s", metavar="[greedy|beam|sample]",
                     help="How to decode [default: the model's (en-de, de-en: beam); sampling "
                     "flags imply sample, beam flags beam; greedy for a model with none]."),
    "beam_size": flag(int, "--beam-size", "-b", help="Hypotheses kept per sentence [default: 5, or the model's]."),
    "length_penalty": flag(float, "--length-penalty", metavar="ALPHA",
                           help="GNMT length penalty alpha; 0 ranks by the plain sum of "
                           "log-probs [default: the model's, from its generation.json, else 0.6]."),
    "n_best": flag(int, "--n-best", help="Print N alternatives per line with their scores "
                   "(beam search)."),
    "top_k": flag(int, "--top-k", "-k", help="Sample only from the k most likely tokens."),
    "top_p": flag(float, "--top-p", "-p", metavar="P",
                  help="Sample only from the nucleus of probability p."),
    "temperature": flag(float, "--temperature", "-T", metavar="T",
                        help="Sampling temperature; 0 is greedy."),
    "seed": flag(int, "--seed", help="Make sampling reproducible."),
    "min_length": flag(int, "--min-length", help="Forbid EOS before this many tokens."),
    "max_length": flag(int, "--max-length", help="At most this many tokens per sentence "
                       "[default: 256, or the model's]."),
    "max_length_factor": flag(float, "--max-length-factor", metavar="X", help="And at most this many "
                              "times the sentence's source tokens, plus 10; 0: no such limit "
                              "[default: 2]."),
    "no_repeat_ngram": flag(int, "--no-repeat-ngram", help="Never repeat an n-gram of this "
                            "many tokens in a translation [default: 0, off, or the model's]."),
}


# the model and where it runs: name -> (annotation, default)
MODEL = {"model": (Model, None), "revision": (Revision, None), "source": (From, None),
         "to": (To, None), "via": (Via, None), "device": (Device, "auto"),
         "dtype": (Dtype, "float32")}


def with_group(group: str, table: dict[str, tuple], exclude: tuple[str, ...] = ()):
    """Give a command the options of `table` (name -> (annotation, default)); it receives
    them as one dict, its parameter named `group`."""
    names = [n for n in table if n not in exclude]

    def decorate(command):
        hints = typing.get_type_hints(command, include_extras=True)  # resolve string annotations
        signature = inspect.signature(command)
        own = [p.replace(annotation=hints[p.name], kind=inspect.Parameter.KEYWORD_ONLY)
               for p in signature.parameters.values() if p.name != group]
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=table[n][1],
                                   annotation=table[n][0]) for n in names]

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {n: kwargs.pop(n) for n in names}
            return command(**kwargs, **{group: values})

        wrapper.__signature__ = signature.replace(parameters=own + extra)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
        return wrapper

    return decorate


def with_decoding(*, exclude: tuple[str, ...] = ()):
    """The decoding flags, as one dict `decoding`, to turn into DecodeOptions with
    `decode_options(**decoding)` inside the command's error handling."""
    return with_group("decoding", {n: (a, None) for n, a in FLAGS.items()}, exclude)


def with_model():
    """The model options (-m, --revision, --from, --to, --via, --device, --dtype), as one
    dict `chosen`, for cli.engine.make_router(**chosen, batch_size=...)."""
    return with_group("chosen", MODEL)


def check_placement(device: str, dtype: str) -> None:
    """--device and --dtype values, checked before anything is loaded (bad ones exit 2)."""
    if device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise UsageError(f"unknown device '{device}'; use auto, cpu or cuda")
    if dtype not in ("float32", "bfloat16", "float16", "int8"):
        raise UsageError(f"unknown dtype '{dtype}'; use float32, bfloat16, float16 or int8")


def decode_options(**flags):
    """Combine the flags into DecodeOptions (core.search.combine); contradictions are a
    UsageError."""
    from core.search import combine

    return combine(**flags)
