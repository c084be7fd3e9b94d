"""The decoding layer: logit transforms, greedy/sampling/beam search, the generation loop, the
KV cache's row reordering, streaming of committed prefixes, and option validation.

Exact expectations come from a scripted fake model whose next-token probabilities are set by
hand, so every hypothesis and score below is worked out in the test itself. Tiny random
Transformers check the properties that must hold for any model (degenerate equalities, cached ==
uncached, batched == alone); their text is garbage, so only strategies are compared, never text."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_model

from core.config import ModelConfig
from core.errors import UsageError
from core import search
from core.generate import generate
from core.search import (NEG_INF, BeamSearch, DecodeOptions, Hypothesis, Sampling, Step,
                         largest, length_penalty, temperature, top_k, top_p)
from core.translator import Translator
from core.utf8 import Utf8Rule

# ---- a scripted fake model ------------------------------------------------------------------

EOS = 3  # ModelConfig's default ids: pad 0, unk 1, bos 2 (also the decoder start), eos 3
A, B, C, D, E = 4, 5, 6, 7, 8
MAX_LENGTH = 10  # scripted sentences all end well before this

Prefix = tuple[int, ...]
Script = Callable[[Prefix], dict[int, float]]  # prefix so far -> next-token probabilities


def tree(table: dict[Prefix, dict[int, float]]) -> Script:
    """Next-token probabilities by prefix; a prefix not in the table ends (EOS with p = 1)."""
    return lambda prefix: table.get(prefix, {EOS: 1.0})


@dataclass
class ScriptedCache:
    """Each decoder row's (script, prefix so far); rows follow `reorder` like a real KVCache."""

    rows: list[tuple[int, Prefix]]
    started: bool = False  # False until the decoder-start token has been fed

    def reorder(self, rows: torch.Tensor, group: int | None = None) -> ScriptedCache:
        return ScriptedCache([self.rows[r] for r in rows.tolist()], self.started)


class ScriptedModel:
    """Duck-types what `generate` needs from a Transformer. Sentence i of the batch follows
    scripts[src[i, 0]]; its log-probabilities are log(p) for scripted tokens, -inf elsewhere."""

    cfg = ModelConfig(vocab_size=10, d_model=8, n_heads=1, d_ff=8, n_encoder_layers=1,
                      n_decoder_layers=1)

    def __init__(self, *scripts: Script):
        self.scripts = scripts

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        return src[:, :1]  # the "memory" is which script each sentence follows

    def new_cache(self, memory: torch.Tensor, src_mask: torch.Tensor, group: int = 1
                  ) -> ScriptedCache:
        return ScriptedCache([(int(s), ()) for s in memory[:, 0] for _ in range(group)])

    def decode_step(self, tokens: torch.Tensor, cache: ScriptedCache):
        rows = cache.rows
        if cache.started:  # the first input is the decoder-start token, not an output token
            rows = [(s, prefix + (tok,)) for (s, prefix), tok in zip(rows, tokens.tolist())]
        logits = torch.full((len(rows), self.cfg.vocab_size), NEG_INF)
        for i, (s, prefix) in enumerate(rows):
            for tok, p in self.scripts[s](prefix).items():
                logits[i, tok] = math.log(p)
        return logits, ScriptedCache(rows, started=True)


# Greedy takes A (0.5) and then the best of a flat continuation: A C = 0.5 * 0.4 = 0.20;
# beam search finds B C = 0.4 * 0.9 = 0.36.
GARDEN_PATH = tree({(): {A: 0.5, B: 0.4, C: 0.1},
                    (A,): {C: 0.4, D: 0.3, E: 0.3},
                    (B,): {C: 0.9, D: 0.1}})

# "A" ends with probability 0.5 (2 tokens with EOS), "B C D E" with 0.4 (5 tokens with EOS):
# the short one wins on raw log-probs, the long one once the GNMT penalty (alpha = 1) divides
# by (5 + 2) / 6 versus (5 + 5) / 6. While "B C" is live, finishing it right away would not
# beat "A" even with the penalty; only growing longer does, so beam search must not stop early.
LENGTH_TRADEOFF = tree({(): {A: 0.5, B: 0.4, C: 0.1},
                        (A,): {EOS: 1.0},
                        (B,): {C: 1.0},
                        (B, C): {D: 1.0},
                        (B, C, D): {E: 1.0}})

# Every live beam starts "A B": beam search can commit those before it knows the ending.
SHARED_START = tree({(): {A: 1.0}, (A,): {B: 1.0}, (A, B): {C: 0.6, D: 0.4}})

# "A" alone finishes early and might still win, so only "A" can be committed until "A B C"
# (0.7) beats it (0.3) at the end.
FINISHED_RIVAL = tree({(): {A: 1.0}, (A,): {EOS: 0.3, B: 0.7}, (A, B): {C: 1.0}})

# EOS is the likeliest first token and likely after "A"; only min_length keeps it out.
EAGER_TO_END = tree({(): {EOS: 0.6, A: 0.4}, (A,): {EOS: 0.9, B: 0.1}})


def never_ending(prefix: Prefix) -> dict[int, float]:
    """Always prefers to go on; EOS only ever has probability 0.01."""
    return {A: 0.6, B: 0.39, EOS: 0.01}


def log(*probs: float) -> float:
    return sum(math.log(p) for p in probs)


# ---- running the decoding loop --------------------------------------------------------------

def decode(model, src, mask, strategy, *, max_length: int, min_length: int = 0, utf8=None):
    """All steps of one `generate` run, and each sentence's n-best list."""
    steps: list[Step] = list(generate(model, src, mask, strategy, max_length=max_length,
                                      min_length=min_length, utf8=utf8))
    finished: dict[int, list[Hypothesis]] = {}
    for step in steps:
        assert not finished.keys() & step.finished.keys(), "a sentence finished twice"
        finished.update(step.finished)
    assert sorted(finished) == list(range(src.size(0))), "every sentence finishes once"
    return steps, finished


def scripted(*scripts: Script, strategy, max_length: int = MAX_LENGTH, min_length: int = 0,
             utf8=None):
    src = torch.arange(len(scripts))[:, None]
    return decode(ScriptedModel(*scripts), src, torch.ones_like(src, dtype=torch.bool), strategy,
                  max_length=max_length, min_length=min_length, utf8=utf8)


def beam(k: int, *, alpha: float = 0.0, n_best: int = 1, max_length: int = MAX_LENGTH):
    return BeamSearch(eos_id=EOS, beam_size=k, max_length=max_length, alpha=alpha, n_best=n_best)


def greedy(alpha: float = 0.0) -> Sampling:
    return Sampling(eos_id=EOS, temperature=0.0, alpha=alpha)


def tokens_of(hyps: list[Hypothesis]) -> list[list[int]]:
    return [h.tokens for h in hyps]


def scores_of(hyps: list[Hypothesis]) -> list[float]:
    return [h.score for h in hyps]


def committed_per_step(steps: list[Step], sentence: int = 0) -> list[list[int]]:
    return [step.committed.get(sentence, []) for step in steps]


# ---- random tiny Transformers ----------------------------------------------------------------

LINES = [
    "A man is riding a bicycle.",
    "Hi",
    "Two dogs play in the snow, said the woman at the park.",
    "Wo ist der Bahnhof?",
    "Grüße aus Köln.",
    "The children are laughing.",
    "Zwei Hunde",
    "Where is the train station? Die Kinder lachen im Park.",
]
RANDOM_MAX_LENGTH = 20


@pytest.fixture(scope="module")
def ending_model(tokenizer):
    """A random model whose hypotheses end at varied lengths (conftest's `model` mostly runs
    to max_length), so sentences and beams leave the batch at different steps."""
    model = tiny_model(tokenizer.vocab_size, seed=1, final_logits_bias=True)
    with torch.no_grad():
        model.embed.weight.mul_(0.25)
        model.logits_bias[tokenizer.eos_id] = 6.0
    return model


@pytest.fixture(params=["model", "ending_model"])
def random_model(request):
    return request.getfixturevalue(request.param)


def source(tokenizer, lines: list[str], model) -> tuple[torch.Tensor, torch.Tensor]:
    return Translator(model, tokenizer).pad(tokenizer.encode_batch(lines))


def decode_lines(model, tokenizer, lines: list[str], **options):
    """Decode `lines` as one batch with DecodeOptions(**options): (steps, n-best lists)."""
    opts = DecodeOptions(max_length=RANDOM_MAX_LENGTH, **options)
    src, mask = source(tokenizer, lines, model)
    return decode(model, src, mask, opts.make(tokenizer.eos_id), max_length=opts.max_length,
                  min_length=opts.min_length)


def assert_same_nbest(got: dict[int, list[Hypothesis]], want: dict[int, list[Hypothesis]]):
    assert got.keys() == want.keys()
    for i in want:
        assert tokens_of(got[i]) == tokens_of(want[i]), f"sentence {i}"
        assert scores_of(got[i]) == pytest.approx(scores_of(want[i]), abs=1e-4), f"sentence {i}"


def assert_same_candidates(got, want):
    """Translator n-best lists: same texts, same scores (up to float noise), line by line."""
    assert [[c.text for c in nbest] for nbest in got] == [[c.text for c in nbest] for nbest in want]
    for i, (g, w) in enumerate(zip(got, want)):
        assert [c.score for c in g] == pytest.approx([c.score for c in w], abs=1e-4), f"line {i}"


# ---- 1. exact results on scripted models ------------------------------------------------------

def test_beam_search_finds_what_greedy_misses():
    """Greedy commits to the locally best first token and ends with a poor continuation; beam
    search keeps the runner-up alive and returns the truly more probable translation."""
    _, greedy_out = scripted(GARDEN_PATH, strategy=greedy())
    assert tokens_of(greedy_out[0]) == [[A, C]]
    assert scores_of(greedy_out[0]) == pytest.approx([log(0.5, 0.4, 1.0)])

    _, beam_out = scripted(GARDEN_PATH, strategy=beam(2))
    assert tokens_of(beam_out[0]) == [[B, C]]
    assert scores_of(beam_out[0]) == pytest.approx([log(0.4, 0.9, 1.0)])


def test_nbest_lists_hypotheses_best_first_with_their_scores():
    """n-best output holds the n best finished hypotheses, best first, each scored by its summed
    log-probability (EOS included) over the GNMT penalty of its length (EOS counted)."""
    _, out = scripted(GARDEN_PATH, strategy=beam(2, n_best=2))
    assert tokens_of(out[0]) == [[B, C], [A, C]]
    assert scores_of(out[0]) == pytest.approx([log(0.4, 0.9), log(0.5, 0.4)])

    _, out = scripted(GARDEN_PATH, strategy=beam(2, n_best=2, alpha=0.6))
    penalty = ((5 + 3) / 6) ** 0.6  # two tokens and EOS
    assert tokens_of(out[0]) == [[B, C], [A, C]]
    assert scores_of(out[0]) == pytest.approx([log(0.4, 0.9) / penalty, log(0.5, 0.4) / penalty])


def test_length_penalty_changes_the_winner():
    """With alpha = 0 the short, more probable hypothesis wins, and beam search stops as soon as
    nothing live can beat it; with alpha = 1 the longer one wins (beam search keeps going while
    a live hypothesis could still overtake by growing), and the n-best list is ordered by the
    penalised score, not by raw probability."""
    steps, out = scripted(LENGTH_TRADEOFF, strategy=beam(2, alpha=0.0))
    assert tokens_of(out[0]) == [[A]]
    assert scores_of(out[0]) == pytest.approx([log(0.5, 1.0)])
    assert len(steps) == 2  # "B C" (0.4) can no longer beat the finished "A" (0.5)

    long_score = log(0.4, 1.0, 1.0, 1.0, 1.0) / ((5 + 5) / 6)
    short_score = log(0.5, 1.0) / ((5 + 2) / 6)
    _, out = scripted(LENGTH_TRADEOFF, strategy=beam(2, alpha=1.0))
    assert tokens_of(out[0]) == [[B, C, D, E]]
    assert scores_of(out[0]) == pytest.approx([long_score])

    _, out = scripted(LENGTH_TRADEOFF, strategy=beam(2, alpha=1.0, n_best=2))
    assert tokens_of(out[0]) == [[B, C, D, E], [A]]
    assert scores_of(out[0]) == pytest.approx([long_score, short_score])


def test_nbest_waits_for_enough_finished_hypotheses():
    """Asking for n-best keeps searching until n hypotheses have finished, even when the best
    one is already certain."""
    _, out = scripted(LENGTH_TRADEOFF, strategy=beam(2, n_best=2))
    assert tokens_of(out[0]) == [[A], [B, C, D, E]]
    assert scores_of(out[0]) == pytest.approx([log(0.5), log(0.4)])


def test_sentences_in_one_batch_do_not_disturb_each_other():
    """Sentences that end at different steps leave the batch without changing the others'
    results: a scripted batch gives each sentence exactly what it gets alone."""
    scripts = [GARDEN_PATH, LENGTH_TRADEOFF, SHARED_START, FINISHED_RIVAL, EAGER_TO_END]
    for make in (lambda: beam(2, n_best=2), lambda: beam(3, alpha=1.0), greedy):
        _, together = scripted(*scripts, strategy=make())
        for i, script in enumerate(scripts):
            _, alone = scripted(script, strategy=make())
            assert_same_nbest({i: together[i]}, {i: alone[0]})


def test_min_length_keeps_eos_out():
    """No strategy ends a sentence before min_length tokens, however likely EOS is."""
    _, out = scripted(EAGER_TO_END, strategy=greedy())
    assert tokens_of(out[0]) == [[]]
    for strategy in (greedy(), beam(2)):
        _, out = scripted(EAGER_TO_END, strategy=strategy, min_length=2)
        assert tokens_of(out[0]) == [[A, B]]


def test_max_length_forces_eos_and_scores_it():
    """A model that never wants to stop is cut at max_length tokens; the forced EOS still adds
    its own log-probability to the score."""
    _, out = scripted(never_ending, strategy=greedy(), max_length=3)
    assert tokens_of(out[0]) == [[A, A, A]]
    assert scores_of(out[0]) == pytest.approx([log(0.6, 0.6, 0.6, 0.01)])

    _, out = scripted(never_ending, strategy=beam(2, n_best=2, max_length=3), max_length=3)
    assert out[0][0].tokens == [A, A, A]
    assert out[0][0].score == pytest.approx(log(0.6, 0.6, 0.6, 0.01))
    assert [len(h.tokens) for h in out[0]] == [3, 3]


# Byte tokens: B is the lead byte of "ä", whose second byte C is the least likely way on.
UTF8_PIECES = [None, None, None, None, b"a", b"\xc3", b"\xa4", b"b", b"\xe2\x82", b"\xac"]
SPLIT_CHARACTER = tree({(): {B: 0.9, A: 0.1}, (B,): {EOS: 0.5, D: 0.3, C: 0.2},
                        (B, C): {EOS: 1.0}, (A,): {EOS: 1.0}})


@pytest.mark.parametrize("strategy", [greedy, lambda: beam(2)], ids=["greedy", "beam"])
def test_a_byte_level_rule_finishes_every_character(strategy):
    """After a lead byte, only its continuation may follow, not EOS or another character, however
    unlikely the model finds it; without the rule the output is broken UTF-8."""
    utf8 = Utf8Rule(UTF8_PIECES, EOS)
    _, out = scripted(SPLIT_CHARACTER, strategy=strategy(), utf8=utf8)
    assert out[0][0].tokens == [B, C]  # "ä"
    assert out[0][0].score == pytest.approx(log(0.9, 0.2, 1.0))
    _, out = scripted(SPLIT_CHARACTER, strategy=strategy())
    assert out[0][0].tokens == [B]


def test_a_forced_end_may_still_split_a_character():
    """At max_length EOS comes even mid-character: the limit wins over the rule."""
    _, out = scripted(SPLIT_CHARACTER, strategy=greedy(), max_length=1,
                      utf8=Utf8Rule(UTF8_PIECES, EOS))
    assert out[0][0].tokens == [B]
    assert out[0][0].score == pytest.approx(log(0.9, 0.5))


class HeldLogits(ScriptedModel):
    """Notes, at each step, how many earlier steps' logits are still alive."""

    def __init__(self, *scripts: Script):
        super().__init__(*scripts)
        self.earlier: list[weakref.ref] = []
        self.alive_at_step: list[int] = []

    def decode_step(self, tokens: torch.Tensor, cache: ScriptedCache):
        self.alive_at_step.append(sum(ref() is not None for ref in self.earlier))
        logits, cache = super().decode_step(tokens, cache)
        self.earlier.append(weakref.ref(logits))
        return logits, cache


@pytest.mark.parametrize("strategy", [greedy, lambda: beam(2)], ids=["greedy", "beam"])
def test_a_step_frees_the_last_steps_logits_before_making_its_own(strategy):
    """At most one step's (N, V) logits are held at a time: with 128 beam rows of a 58k
    vocabulary they are 30 MB, and holding two would raise the peak memory by as much."""
    model = HeldLogits(never_ending)
    src = torch.zeros(1, 1, dtype=torch.long)
    decode(model, src, torch.ones_like(src, dtype=torch.bool), strategy(), max_length=5)
    assert len(model.alive_at_step) == 6 and set(model.alive_at_step) == {0}


# ---- 2. degenerate strategies equal greedy ------------------------------------------------------

@pytest.mark.parametrize("options", [
    dict(strategy="beam", beam_size=1),
    dict(strategy="sample", top_k=1, seed=0),
    dict(strategy="sample", temperature=0.0),
], ids=["beam-size-1", "top-k-1", "temperature-0"])
def test_degenerate_strategies_equal_greedy(random_model, tokenizer, options):
    """Beam search with one beam, sampling restricted to the top token and sampling at
    temperature 0 are all greedy decoding: same tokens and same scores."""
    _, want = decode_lines(random_model, tokenizer, LINES, strategy="greedy")
    _, got = decode_lines(random_model, tokenizer, LINES, **options)
    assert_same_nbest(got, want)


# ---- 3. sampling stays inside top-k / the nucleus, and seeds are reproducible -----------------

# Vocabulary order differs from rank order: ranked, the tokens are 3 (0.30), 1 (0.25),
# 4 (0.20), then 2 and 5 (0.10 each) and 0 (0.05).
PROBS = torch.tensor([0.05, 0.25, 0.10, 0.30, 0.20, 0.10])


def shaped(t: float, allowed: set[int]) -> dict[int, float]:
    """PROBS at temperature t, restricted to `allowed` and renormalised."""
    weights = {i: float(PROBS[i]) ** (1 / t) for i in allowed}
    total = sum(weights.values())
    return {i: w / total for i, w in weights.items()}


@pytest.mark.parametrize("k, p, t, allowed", [
    (2, 1.0, 1.0, {3, 1}),
    (3, 1.0, 1.0, {3, 1, 4}),
    (2, 1.0, 5.0, {3, 1}),  # a high temperature flattens, but cannot widen top-k
    (0, 0.5, 1.0, {3, 1}),  # 0.30 < 0.5 <= 0.30 + 0.25
    (0, 0.6, 1.0, {3, 1, 4}),  # 0.55 < 0.6 <= 0.75
    (0, 0.6, 0.5, {3, 1}),  # the nucleus of the temperature-shaped distribution
    (3, 0.5, 1.0, {3, 1}),  # both filters apply
])
def test_sampling_never_leaves_top_k_or_the_nucleus(k, p, t, allowed):
    """Over thousands of draws, sampling picks only tokens inside top-k and the top-p nucleus,
    picks each of them, and in proportion to the renormalised, temperature-shaped probability."""
    strategy = Sampling(eos_id=EOS, temperature=t, top_k=k, top_p=p, seed=0)
    strategy.start(1, torch.device("cpu"))
    n = 6000
    draws = strategy.choose(PROBS.log().expand(n, -1))[0].tolist()
    assert set(draws) == allowed
    for token, prob in shaped(t, allowed).items():
        assert draws.count(token) / n == pytest.approx(prob, abs=0.03)


def test_same_seed_same_sample(model, tokenizer):
    """Sampling with a seed is reproducible: the same seed gives the same output twice."""
    translator = Translator(model, tokenizer, batch_size=3)
    first = translator.translate(LINES, strategy="sample", seed=7, max_length=RANDOM_MAX_LENGTH)
    again = translator.translate(LINES, strategy="sample", seed=7, max_length=RANDOM_MAX_LENGTH)
    assert first == again


def test_different_or_no_seeds_give_different_samples(model, tokenizer):
    """Sampling is random: different seeds, and unseeded runs, do not all give one output."""
    translator = Translator(model, tokenizer)

    def sample(**seed):
        return tuple(translator.translate(LINES, strategy="sample",
                                          max_length=RANDOM_MAX_LENGTH, **seed))

    assert len({sample(seed=s) for s in range(5)}) > 1
    assert len({sample() for _ in range(5)}) > 1


def test_sampling_a_byte_level_vocabulary_gives_whole_characters(ending_model, tokenizer):
    """Sampled freely, a random model splits characters between byte tokens (U+FFFD once
    decoded); under the tokenizer's rule every translation decodes whole, both those that end
    and those the length limit cuts (which lose an unfinished last character)."""
    src, mask = source(tokenizer, LINES, ending_model)

    def sample(utf8, seed):
        options = DecodeOptions(strategy="sample", temperature=1.5, seed=seed)
        _, out = decode(ending_model, src, mask, options.make(tokenizer.eos_id),
                        max_length=RANDOM_MAX_LENGTH, utf8=utf8)
        return [hyps[0].tokens for hyps in out.values()]

    texts = [tokenizer.decode(t) for seed in range(3) for t in sample(None, seed)]
    assert any("\ufffd" in text for text in texts)
    guarded = [t for seed in range(3) for t in sample(tokenizer.utf8_rule, seed)]
    assert not [t for t in guarded if "\ufffd" in tokenizer.decode(t)]
    lengths = {len(t) < RANDOM_MAX_LENGTH for t in guarded}
    assert lengths == {True, False}  # some ended, some were cut


# ---- 4. logit transforms -------------------------------------------------------------------------

LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0],
                       [0.0, 0.2, 0.1, -0.3, -0.1]])


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row > NEG_INF)[:, 0].tolist()) for row in logits]


def test_top_k_keeps_the_k_highest_of_each_row():
    """top-k keeps exactly the k highest logits per row, untouched; k = 0 or k >= V keeps all."""
    out = top_k(LOGITS, 2)
    assert kept(out) == [{3, 0}, {1, 2}]
    assert kept(top_k(LOGITS, 1)) == [{3}, {1}]
    mask = out > NEG_INF
    assert torch.equal(out[mask], LOGITS[mask])
    for k in (0, 5, 9):
        assert torch.equal(top_k(LOGITS, k), LOGITS)


def test_top_p_keeps_the_nucleus_and_at_least_one_token():
    """top-p keeps the smallest most-likely set reaching p, per row; a tiny p still keeps the
    most likely token, and p = 1 keeps everything."""
    logits = PROBS.log()[None]
    assert kept(top_p(logits, 0.5)) == [{3, 1}]
    assert kept(top_p(logits, 0.7)) == [{3, 1, 4}]  # 0.55 < 0.7 <= 0.75
    assert kept(top_p(logits, 1e-9)) == [{3}]
    assert kept(top_p(LOGITS, 1e-9)) == [{3}, {1}]
    assert torch.equal(top_p(LOGITS, 1.0), LOGITS)
    peaked_and_flat = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert kept(top_p(peaked_and_flat, 0.9)) == [{0}, {0, 1, 2, 3}]
    with_forbidden = torch.tensor([[NEG_INF, 1.0, NEG_INF, 0.0]])
    assert kept(top_p(with_forbidden, 1e-9)) == [{1}]


def test_temperature_sharpens_or_flattens():
    """Temperature t turns probabilities p into p^(1/t) renormalised: t = 1 changes nothing,
    t < 1 sharpens and t > 1 flattens, keeping the most likely token on top."""
    logits = PROBS.log()[None]
    assert torch.equal(temperature(logits, 1.0), logits)
    for t in (0.5, 2.0):
        want = PROBS ** (1 / t)
        assert torch.allclose(temperature(logits, t).softmax(-1)[0], want / want.sum())
    assert temperature(logits, 0.5).softmax(-1).max() > PROBS.max()
    assert temperature(logits, 2.0).softmax(-1).max() < PROBS.max()
    assert temperature(logits, 0.5).argmax() == temperature(logits, 2.0).argmax() == 3


@pytest.mark.parametrize("rows, vocab, k", [(1, 58101, 1), (5, 58101, 8), (3, 9000, 5),
                                             (4, 32000, 10), (3, 25603, 8), (2, 300, 8),
                                             (4, 50, 3)])
@pytest.mark.parametrize("blocks_from", [0, search.BLOCKS_FROM])
def test_largest_equals_torch_topk(rows, vocab, k, blocks_from, monkeypatch):
    """largest() gives torch.topk's values and columns, wherever the winners are: spread out,
    all in one block, or in the columns after the last whole block (fewer than k of them
    there: 25,603 is 200 blocks of 128 and 3); narrowed by blocks at any size (BLOCKS_FROM 0)
    or from where it does so."""
    monkeypatch.setattr(search, "BLOCKS_FROM", blocks_from)
    g = torch.Generator().manual_seed(vocab + k)
    x = torch.randn(rows, vocab, generator=g)
    x[0, :k] += 10  # one block holds all the winners
    x[-1, -k:] += 10  # the winners are in the leftover columns
    x[:, 2] = NEG_INF
    values, columns = largest(x, k)
    want = x.topk(k, dim=-1)
    assert torch.equal(values, want.values) and torch.equal(columns, want.indices)


def test_largest_one_takes_the_first_of_tied_columns():
    """Greedy decoding's pick below BLOCKS_FROM: of equal highest values, the first column, as
    torch.argmax (and Hugging Face's greedy search) takes it."""
    x = torch.zeros(2, 58101)
    x[0, [7, 4000, 58100]] = 3.0
    x[1, [58099, 58100]] = 3.0
    values, columns = largest(x, 1)
    assert columns[:, 0].tolist() == [7, 58099] and values[:, 0].tolist() == [3.0, 3.0]


def test_length_penalty_is_gnmt():
    """The penalty is ((5 + length) / 6) ^ alpha; alpha = 0 leaves scores as plain sums."""
    assert length_penalty(17, 0.0) == 1.0
    assert length_penalty(1, 1.0) == pytest.approx(1.0)
    assert length_penalty(7, 1.0) == pytest.approx(2.0)
    assert length_penalty(13, 0.5) == pytest.approx(math.sqrt(3.0))


# ---- 5. the KV cache follows the beams ---------------------------------------------------------

@dataclass
class PrefixCache:
    """What an uncached decoder needs per row: the encoder output and the whole prefix."""

    memory: torch.Tensor  # (N, S, D)
    src_mask: torch.Tensor  # (N, S)
    prefix: torch.Tensor  # (N, t)

    def reorder(self, rows: torch.Tensor, group: int | None = None) -> PrefixCache:
        return PrefixCache(self.memory[rows], self.src_mask[rows], self.prefix[rows])


class Uncached:
    """A Transformer decoding without its KV cache: each step re-runs the teacher-forced
    decoder over the row's whole prefix and keeps the last position's logits."""

    def __init__(self, model):
        self.model, self.cfg = model, model.cfg

    def encode(self, src, src_mask):
        return self.model.encode(src, src_mask)

    def new_cache(self, memory, src_mask, group: int = 1) -> PrefixCache:
        memory, src_mask = memory.repeat_interleave(group, 0), src_mask.repeat_interleave(group, 0)
        empty = torch.zeros(memory.size(0), 0, dtype=torch.long, device=memory.device)
        return PrefixCache(memory, src_mask, empty)

    def decode_step(self, tokens, cache: PrefixCache):
        prefix = torch.cat([cache.prefix, tokens[:, None]], dim=1)  # (N, t + 1)
        logits = self.model.decode(prefix, cache.memory, cache.src_mask)[:, -1]  # (N, V)
        return logits, PrefixCache(cache.memory, cache.src_mask, prefix)


@pytest.mark.parametrize("options", [
    dict(strategy="beam", beam_size=4, n_best=4),
    dict(strategy="beam", beam_size=3, n_best=2, length_penalty=1.0),
    dict(strategy="greedy"),
], ids=["beam4", "beam3-alpha1", "greedy"])
def test_kv_cache_reordering_matches_uncached_decoding(random_model, tokenizer, options):
    """Beams that swap, repeat and drop rows carry the right self-attention keys and values:
    decoding with the KV cache gives the same n-best tokens and scores as recomputing every
    prefix from scratch."""
    src, mask = source(tokenizer, LINES, random_model)
    opts = DecodeOptions(max_length=RANDOM_MAX_LENGTH, **options)

    def run(model):
        return decode(model, src, mask, opts.make(tokenizer.eos_id), max_length=opts.max_length)

    _, cached = run(random_model)
    _, uncached = run(Uncached(random_model))
    assert_same_nbest(cached, uncached)


def test_beam_search_decodes_each_sentence_once_at_the_first_step(random_model, tokenizer,
                                                                  monkeypatch):
    """Beam search's first step decodes each sentence once, not once per beam (its beams would
    all hold the same empty hypothesis); from the second step on a sentence has beam_size rows,
    which all read its one copy of the cross-attention keys and values."""
    seen, step = [], random_model.decode_step

    def recording(tokens, cache):
        seen.append((tokens.numel(), cache.group, cache.cross_k[0].size(0)))
        return step(tokens, cache)

    monkeypatch.setattr(random_model, "decode_step", recording)
    # no EOS before the third token, so that no sentence ends within the steps looked at
    decode_lines(random_model, tokenizer, LINES, strategy="beam", beam_size=4, min_length=3)
    n = len(LINES)
    assert seen[:3] == [(n, 1, n), (4 * n, 4, n), (4 * n, 4, n)]


# ---- 6. batching does not change results -------------------------------------------------------

@pytest.mark.parametrize("options", [
    dict(strategy="greedy"),
    dict(strategy="beam", beam_size=4, n_best=3),
], ids=["greedy", "beam"])
@pytest.mark.parametrize("batch_size", [3, 32])
def test_batch_gives_the_same_results_as_each_line_alone(ending_model, tokenizer, options,
                                                        batch_size):
    """Translating lines of different lengths together (padded, sorted, split into batches)
    gives each line the n-best list it gets alone, in input order; blank lines pass through."""
    lines = LINES + ["", "   "]
    translator = Translator(ending_model, tokenizer, batch_size=batch_size)
    together = translator.translate_nbest(lines, max_length=RANDOM_MAX_LENGTH, **options)
    alone = [translator.translate_nbest([line], max_length=RANDOM_MAX_LENGTH, **options)[0]
             for line in lines]
    assert_same_candidates(together, alone)
    assert [nbest[0].text for nbest in together[-2:]] == ["", "   "]


# ---- 7. streaming committed prefixes -----------------------------------------------------------

@pytest.mark.parametrize("script, commits", [
    (SHARED_START, [[A], [B], [], [C]]),
    (FINISHED_RIVAL, [[A], [], [], [B, C]]),
], ids=["shared-start", "finished-rival"])
def test_beam_search_commits_shared_prefixes_early(script, commits):
    """Beam search reports tokens as final as soon as every live beam shares them and no
    finished rival disagrees, before the sentence ends; the rest comes with the end."""
    steps, out = scripted(script, strategy=beam(2))
    assert committed_per_step(steps) == commits
    assert sum(commits, []) == out[0][0].tokens
    assert list(steps[-1].finished) == [0]


def test_greedy_commits_every_token_as_it_goes():
    """Greedy decoding reports each token as final the step it is chosen."""
    steps, out = scripted(SHARED_START, strategy=greedy())
    assert committed_per_step(steps) == [[A], [B], [C], []]
    assert out[0][0].tokens == [A, B, C]


@pytest.mark.parametrize("options", [
    dict(strategy="greedy"),
    dict(strategy="beam", beam_size=4),
    dict(strategy="beam", beam_size=4, n_best=3, length_penalty=1.0),
], ids=["greedy", "beam", "beam-nbest-alpha1"])
def test_committed_tokens_add_up_to_the_best_hypothesis(random_model, tokenizer, options):
    """For every sentence of a batch, the tokens committed step by step, concatenated, are
    exactly the final best hypothesis: nothing committed is ever taken back."""
    steps, out = decode_lines(random_model, tokenizer, LINES, **options)
    for i in out:
        assert sum(committed_per_step(steps, i), []) == out[i][0].tokens, f"sentence {i}"


@pytest.mark.parametrize("options", [
    dict(strategy="greedy"),
    dict(strategy="beam", beam_size=4),
], ids=["greedy", "beam"])
def test_stream_adds_up_to_translate(ending_model, tokenizer, options):
    """Translator.stream yields pieces whose concatenation is the translation that
    Translator.translate returns for the same line and options (blank lines included)."""
    translator = Translator(ending_model, tokenizer)
    pieces = {}
    for line in LINES + [""]:
        pieces[line] = list(translator.stream(line, max_length=RANDOM_MAX_LENGTH, **options))
        want = translator.translate([line], max_length=RANDOM_MAX_LENGTH, **options)[0]
        assert "".join(pieces[line]) == want, line
    if options["strategy"] == "greedy":
        assert any(len(p) > 1 for p in pieces.values()), "greedy streams piece by piece"


# ---- 8. option validation ------------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    dict(strategy="beam", beam_size=0),
    dict(strategy="sample", top_p=1.5),
    dict(strategy="sample", top_p=0.0),
    dict(strategy="sample", temperature=-0.5),
    dict(strategy="sample", top_k=-1),
    dict(strategy="beam", beam_size=2, n_best=3),
    dict(strategy="greedy", n_best=2),
    dict(strategy="sample", n_best=2),
    dict(strategy="beam", length_penalty=-0.1),
    dict(max_length=0),
    dict(min_length=11, max_length=10),
    dict(strategy="nucleus"),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_invalid_options_are_usage_errors(options):
    """Out-of-range or contradictory decoding options are rejected up front as UsageError."""
    with pytest.raises(UsageError):
        DecodeOptions(**options)


@pytest.mark.parametrize("options", [
    dict(strategy="beam", beam_size=1),
    dict(strategy="beam", beam_size=3, n_best=3),
    dict(strategy="sample", top_p=1.0, temperature=0.0, top_k=0),
    dict(min_length=10, max_length=10),
])
def test_boundary_options_are_accepted(options):
    """The edges of each valid range are accepted."""
    DecodeOptions(**options)


def test_translator_rejects_bad_options_before_decoding(model, tokenizer):
    """Translator.translate and Translator.stream raise UsageError for invalid options."""
    translator = Translator(model, tokenizer)
    with pytest.raises(UsageError):
        translator.translate(["Hello."], strategy="beam", beam_size=0)
    with pytest.raises(UsageError):
        list(translator.stream("Hello.", strategy="greedy", n_best=2))
