"""Decoding flags, declared once and added to every command that decodes (translate, eval),
and the rules that combine them into DecodeOptions."""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Annotated, Optional

import typer

from core.errors import UsageError

def flag(kind, *names: str, help: str):
    return Annotated[Optional[kind], typer.Option(*names, help=help, show_default=False)]


# name -> annotation; None means "not given", so DecodeOptions' defaults apply
FLAGS = {
    "strategy": flag(str, "--strategy", "-s", help="greedy, beam or sample [default: greedy; "
                     "sampling flags imply sample, beam flags imply beam]."),
    "beam_size": flag(int, "--beam-size", "-b", help="Hypotheses kept per sentence [default: 5, or the model's]."),
    "length_penalty": flag(float, "--length-penalty", help="GNMT length penalty alpha; 0 ranks "
                           "by the plain sum of log-probs [default: 0.6]."),
    "n_best": flag(int, "--n-best", help="Print N alternatives per line with their scores "
                   "(beam search)."),
    "top_k": flag(int, "--top-k", "-k", help="Sample only from the k most likely tokens."),
    "top_p": flag(float, "--top-p", "-p", help="Sample only from the nucleus of probability p."),
    "temperature": flag(float, "--temperature", "-T", help="Sampling temperature; 0 is greedy."),
    "seed": flag(int, "--seed", help="Make sampling reproducible."),
    "min_length": flag(int, "--min-length", help="Forbid EOS before this many tokens."),
    "max_length": flag(int, "--max-length", help="At most this many tokens per sentence "
                       "[default: 256, or the model's]."),
}


def with_decoding(*, exclude: tuple[str, ...] = ()):
    """Give a command the decoding flags; it receives them as one dict, `decoding`, to turn
    into DecodeOptions with `decode_options(**decoding)` inside its error handling."""
    names = [n for n in FLAGS if n not in exclude]

    def decorate(command):
        hints = typing.get_type_hints(command, include_extras=True)  # resolve string annotations
        signature = inspect.signature(command)
        own = [p.replace(annotation=hints[p.name], kind=inspect.Parameter.KEYWORD_ONLY)
               for p in signature.parameters.values() if p.name != "decoding"]
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None,
                                   annotation=FLAGS[n]) for n in names]

        @functools.wraps(command)
        def wrapper(**kwargs):
            decoding = {n: kwargs.pop(n) for n in names}
            return command(**kwargs, decoding=decoding)

        wrapper.__signature__ = signature.replace(parameters=own + extra)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
        return wrapper

    return decorate


def decode_options(*, strategy=None, beam_size=None, n_best=None, top_k=None, top_p=None,
                   temperature=None, **rest):
    """Combine the flags into DecodeOptions; contradictions are a UsageError."""
    from core.search import DecodeOptions

    sampling = {"--top-k": top_k, "--top-p": top_p, "--temperature": temperature}
    beam = {"--beam-size": beam_size, "--n-best": n_best}
    given_sampling = [flag for flag, value in sampling.items() if value is not None]
    given_beam = [flag for flag, value in beam.items() if value is not None]
    if strategy is None:
        if given_sampling and given_beam:
            raise UsageError(f"{given_sampling[0]} (sampling) and {given_beam[0]} (beam search) "
                             "do not go together")
        strategy = "sample" if given_sampling else "beam" if given_beam else "greedy"
    if given_sampling and strategy != "sample":
        raise UsageError(f"{given_sampling[0]} only applies to sampling, not -s {strategy}")
    if given_beam and strategy != "beam" and not (n_best == 1 and beam_size is None):
        raise UsageError(f"{given_beam[0]} only applies to beam search, not -s {strategy}")
    values = dict(rest, strategy=strategy, beam_size=beam_size, n_best=n_best, top_k=top_k,
                  top_p=top_p, temperature=temperature)
    return DecodeOptions(**{k: v for k, v in values.items() if v is not None})
