"""Decoding flags shared by the translate and eval commands, and the rules that combine them."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from core.errors import UsageError

PANEL = "Decoding"

Strategy = Annotated[Optional[str], typer.Option(
    "--strategy", "-s", help="greedy, beam or sample (default: greedy; sampling flags imply "
                             "sample, beam flags imply beam).", rich_help_panel=PANEL)]
BeamSize = Annotated[Optional[int], typer.Option(
    "--beam-size", "-b", help="Hypotheses kept per sentence [default: 5].", rich_help_panel=PANEL)]
LengthPenalty = Annotated[float, typer.Option(
    help="GNMT length penalty alpha; 0 ranks by the plain sum of log-probs.",
    rich_help_panel=PANEL)]
NBest = Annotated[Optional[int], typer.Option(
    "--n-best", help="Print N alternatives per line with their scores (beam search).",
    rich_help_panel=PANEL)]
TopK = Annotated[Optional[int], typer.Option(
    "--top-k", "-k", help="Sample only from the k most likely tokens.", rich_help_panel=PANEL)]
TopP = Annotated[Optional[float], typer.Option(
    "--top-p", "-p", help="Sample only from the nucleus of probability p.", rich_help_panel=PANEL)]
Temperature = Annotated[Optional[float], typer.Option(
    "--temperature", "-T", help="Sampling temperature; 0 is greedy.", rich_help_panel=PANEL)]
Seed = Annotated[Optional[int], typer.Option(
    help="Make sampling reproducible.", rich_help_panel=PANEL)]
MinLength = Annotated[int, typer.Option(
    help="Forbid EOS before this many tokens.", rich_help_panel=PANEL)]
MaxLength = Annotated[int, typer.Option(
    help="At most this many tokens per sentence.", rich_help_panel=PANEL)]


def decode_options(*, strategy: str | None, beam_size: int | None, length_penalty: float,
                   n_best: int | None, top_k: int | None, top_p: float | None,
                   temperature: float | None, seed: int | None, min_length: int,
                   max_length: int):
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
    values = dict(strategy=strategy, length_penalty=length_penalty, seed=seed,
                  min_length=min_length, max_length=max_length, beam_size=beam_size,
                  n_best=n_best, top_k=top_k, top_p=top_p, temperature=temperature)
    return DecodeOptions(**{k: v for k, v in values.items() if v is not None})
