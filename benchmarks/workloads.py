"""The benchmark's inputs: token ids only, so every engine sees exactly the same sources and no
tokenizer time is measured. Also the paths and ids every other module shares; this module
imports nothing heavy, so an engine process pays only for its own engine."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

WORK = Path(__file__).resolve().parent / ".work"  # gitignored: models and results
MARIAN = WORK / "marian"  # Hugging Face Marian directory (transformers, and source of the rest)
OURS = WORK / "ours"  # our checkpoint, converted by core.marian
CT2 = WORK / "ct2"  # CTranslate2 model, converted by its TransformersConverter
RESULTS = WORK / "results.json"

# opus-mt-en-de's vocabulary layout: </s> 0, <unk> 1, pieces, <pad> last
VOCAB_SIZE, EOS, UNK, PAD = 58101, 0, 1, 58100
FIRST_ID, LAST_ID = 2, 58099  # sources use only ordinary pieces
NEW_TOKENS = 30  # every engine must produce exactly this many tokens per sentence
BATCH = 32


@dataclass(frozen=True)
class Workload:
    name: str
    about: str
    beam: int  # 1 = greedy
    batches: tuple[tuple[tuple[int, ...], ...], ...]  # each source ends with EOS

    @property
    def sentences(self) -> int:
        return sum(len(b) for b in self.batches)

    @property
    def output_tokens(self) -> int:
        return self.sentences * NEW_TOKENS


def sentence(rng: random.Random, length: int) -> tuple[int, ...]:
    """`length` source tokens, EOS included, as a Marian tokenizer would produce them."""
    return tuple(rng.randint(FIRST_ID, LAST_ID) for _ in range(length - 1)) + (EOS,)


def build() -> dict[str, Workload]:
    rng = random.Random(0)
    one = ((sentence(rng, 20),),)
    many = sorted((sentence(rng, rng.randint(8, 40)) for _ in range(64)), key=len)
    # sorted by length and cut here, so all engines get the same two batches of 32
    batches = tuple(tuple(many[i:i + BATCH]) for i in range(0, len(many), BATCH))
    return {w.name: w for w in [
        Workload("W1", "1 sentence, 20 source tokens, greedy", 1, one),
        Workload("W2", "1 sentence, 20 source tokens, beam 4", 4, one),
        Workload("W3", "64 sentences, 8-40 source tokens, greedy, 2 batches of 32", 1, batches),
        Workload("W4", "64 sentences, 8-40 source tokens, beam 4, 2 batches of 32", 4, batches),
    ]}


WORKLOADS = build()
