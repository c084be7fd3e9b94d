"""Does every sentence of a line come back? Output length against input length for lines of
several sentences, and for one very long line.

    python -m benchmarks.segmentation                      # the code of this checkout
    PYTHONPATH=../old-checkout python -m benchmarks.segmentation   # another checkout's core/

Lines of 3-6 sentences are built from Tatoeba test sentences (English side, seeded); a line's
character ratio is len(translation) / len(source). Single sentences give the range to expect.
Then one line of about 40,000 characters is translated whole and sentence by sentence."""

from __future__ import annotations

import argparse
import gzip
import random
import statistics
import time

TATOEBA = "../shared/data/opus-mt-testsets/deu-eng/tatoeba-test-v2021-08-07.eng.gz"


def ratios(sources: list[str], outputs: list[str]) -> list[float]:
    return [len(o) / len(s) for s, o in zip(sources, outputs)]


def summary(values: list[float]) -> str:
    q = statistics.quantiles(values, n=20)
    return (f"median {statistics.median(values):.2f}, 5%-95% {q[0]:.2f}-{q[-1]:.2f}, "
            f"below 0.5: {sum(v < 0.5 for v in values) / len(values):.1%}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="en-de")
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--long", type=int, default=40_000, help="characters of the long line")
    args = parser.parse_args(argv)

    import core.translator
    from core import models
    from core.translator import Translator

    with gzip.open(TATOEBA, "rt", encoding="utf-8") as f:
        pool = [s.strip() for s in f if 20 <= len(s.strip()) <= 120 and s.strip()[-1] in ".!?"]
    rng = random.Random(1)
    singles = rng.sample(pool, args.lines)
    paragraphs = [" ".join(rng.sample(pool, rng.randint(3, 6))) for _ in range(args.lines)]
    ckpt = models.load(args.model, "cpu")
    translator = Translator(ckpt.model, ckpt.tokenizer)
    options = ckpt.generation
    print(f"code: {core.translator.__file__}; model {args.model}, decoding {options}")
    t0 = time.perf_counter()
    single_out = translator.translate(singles, **options)
    para_out = translator.translate(paragraphs, **options)
    print(f"single sentences ({len(singles)}):      {summary(ratios(singles, single_out))}")
    print(f"lines of 3-6 sentences ({len(paragraphs)}): {summary(ratios(paragraphs, para_out))}")
    long_sentences = []
    while sum(len(s) + 1 for s in long_sentences) < args.long:
        long_sentences.append(rng.choice(pool))
    long_line = " ".join(long_sentences)
    whole = translator.translate([long_line], **options)[0]
    one_by_one = " ".join(translator.translate(long_sentences, **options))
    print(f"a line of {len(long_line):,} characters ({len(long_sentences)} sentences): "
          f"{len(whole):,} characters out; sentence by sentence: {len(one_by_one):,} "
          f"({len(whole) / len(one_by_one):.1%})")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
