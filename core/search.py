"""Decoding strategies: pure logit transforms, and Sampling / BeamSearch with one `step()`.

A strategy sees the model's next-token log-probabilities for every live row and decides the
next tokens, which rows survive (and whose cache they inherit), and what became final. Greedy
is sampling at temperature 0; beam search with one beam gives the same result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from core.errors import UsageError

NEG_INF = float("-inf")


# ---- logit transforms: pure functions (V is the last dimension) --------------------------

def temperature(logits: Tensor, t: float) -> Tensor:
    return logits / t


def top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k highest logits of each row; k <= 0 keeps all."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (N, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (the nucleus)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    drop_sorted = before >= p  # the first token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def ban_repeats(logprobs: Tensor, history: Tensor, n: int) -> Tensor:
    """Forbid each row (N, V) the tokens that would repeat an n-gram of its history (N, t):
    those that followed an earlier occurrence of its last n-1 tokens."""
    N, t = history.shape
    if n < 1 or t < n:  # no whole n-gram yet (n = 1: no token yet)
        return logprobs
    grams = history.unfold(1, n, 1)  # (N, t-n+1, n)
    last = history[:, t - n + 1:]  # (N, n-1) the prefix the next token would complete
    seen = (grams[:, :, :-1] == last[:, None, :]).all(-1)  # (N, t-n+1)
    row, at = seen.nonzero(as_tuple=True)
    return logprobs.index_put((row, grams[row, at, -1]), logprobs.new_tensor(NEG_INF))


BLOCKS_FROM = 250_000  # values in all, from which largest() narrows by blocks


def largest(x: Tensor, k: int, *, size: int = 128) -> tuple[Tensor, Tensor]:
    """The k highest values of each row of a 2-D x and their columns, as torch.topk gives them.

    Faster than torch.topk on the CPU over many rows of a large vocabulary: only the k column
    blocks (of `size` columns) with the highest maxima can hold a row's k highest values, so
    one cheap max pass narrows the search to k blocks and the columns left over after the last
    block. Zen 3 EPYC, 2 threads: 128 rows' 8 best of 58k 1.58 ms (torch.topk 4.97, blocks of
    256 1.78), 160 rows' 10 best of 8,000 0.75 (torch.topk 1.00, blocks of 256 0.94). Its dozen
    operations cost about 0.2 ms where a decoding step calls it, just after the output layer,
    so below BLOCKS_FROM values in all one call is the faster: torch.topk's, or for k = 1
    argmax's, whose tie goes to the first column (Zen 4 EPYC, 2 threads, 119 MB streamed before
    each call, ms, blocks against torch.topk: one row's best of 58k 0.26 against 0.14, 4 rows'
    8 best 0.29 against 0.24, 8 rows' 0.49 against 0.65; 16 rows' 8 best of 32,000 0.42 against
    0.56). Shorter rows favour torch.topk a little further: just above it, 8 rows' 8 best of
    32,000 took 0.23 against 0.20, 32 rows' of 8,000 0.34 against 0.23."""
    N, V = x.shape
    blocks = V // size
    if k > blocks or N * V < BLOCKS_FROM:
        if k == 1:  # argmax's scan beats topk's search: greedy decoding's pick, one row of
            # 58k in place, 90-155 us against 170-271 (Zen 3 EPYC, 2 threads)
            at = x.argmax(-1, keepdim=True)  # (N, 1) the first highest column
            return x.gather(1, at), at
        return x.topk(k, dim=-1)
    body = x[:, : blocks * size].view(N, blocks, size)  # (N, blocks, size), a view
    top_blocks = body.amax(-1).topk(k, dim=-1).indices  # (N, k)
    # indexing, not gather: gather's per-element indices cost 1.2 ms where this takes 0.33
    # (160 rows' 10 blocks of 256, one thread)
    picked = body[torch.arange(N, device=x.device)[:, None], top_blocks].view(N, k * size)
    values, at = torch.cat([picked, x[:, blocks * size:]], 1).topk(k, dim=-1)  # (N, k)
    in_blocks = at < k * size
    block = top_blocks.gather(1, (at // size).clamp(max=k - 1))
    return values, torch.where(in_blocks, block * size + at % size, at - k * size + blocks * size)


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + length) / 6) ^ alpha; alpha = 0 scores by plain log-prob sum."""
    return ((5.0 + length) / 6.0) ** alpha


# ---- what a step reports ---------------------------------------------------------------

@dataclass
class Hypothesis:
    tokens: list[int]  # without EOS
    score: float  # sum of log-probs (EOS included) / length_penalty(len + 1, alpha)


@dataclass
class Step:
    """What one decoding step settled, keyed by sentence index in the batch."""

    committed: dict[int, list[int]] = field(default_factory=dict)  # tokens now final, appended
    finished: dict[int, list[Hypothesis]] = field(default_factory=dict)  # n-best of ended ones


class Strategy:
    """Owns the hypotheses of one batch; the generation loop owns the model and the cache."""

    def start(self, batch_size: int, device: torch.device) -> Tensor:
        """Begin a batch; return the encoder row each decoder row reads (N,)."""
        raise NotImplementedError

    def step(self, logprobs: Tensor) -> tuple[Step, Tensor, Tensor]:
        """(N, V) log-probs -> (report, surviving rows' origins (N',), their next tokens (N',))."""
        raise NotImplementedError

    @property
    def group(self) -> int:
        """Decoder rows per live sentence, as the last start() or step() left them."""
        return 1


class Sampling(Strategy):
    """Draw each token from the (temperature, top-k, top-p)-shaped distribution; temperature 0
    takes the arg-max, which is greedy decoding."""

    def __init__(self, *, eos_id: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, alpha: float = 0.0):
        self.eos_id, self.t, self.k, self.p, self.alpha = eos_id, temperature, top_k, top_p, alpha
        self.seed = seed
        self.generator: torch.Generator | None = None

    def start(self, batch_size: int, device: torch.device) -> Tensor:
        if self.t > 0 and (self.generator is None or self.generator.device != device):
            self.generator = torch.Generator(device)  # one stream per strategy, across batches
            if self.seed is None:
                self.generator.seed()  # from the OS: differs run to run
            else:
                self.generator.manual_seed(self.seed)
        self.sentences = list(range(batch_size))  # sentence of each live row
        self.tokens: list[list[int]] = [[] for _ in range(batch_size)]
        self.scores = torch.zeros(batch_size, device=device)
        return torch.arange(batch_size, device=device)

    def choose(self, logprobs: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's token and its log-probability: (N,), (N,)."""
        if self.t == 0:
            values, columns = largest(logprobs, 1)  # (N, 1) the arg-max and its value
            return columns[:, 0], values[:, 0]
        logits = top_p(top_k(temperature(logprobs, self.t), self.k), self.p)
        chosen = torch.multinomial(logits.softmax(-1), 1, generator=self.generator)  # (N, 1)
        return chosen[:, 0], logprobs.gather(1, chosen)[:, 0]

    def step(self, logprobs: Tensor) -> tuple[Step, Tensor, Tensor]:
        chosen, chosen_logprobs = self.choose(logprobs)  # (N,), (N,)
        self.scores = self.scores + chosen_logprobs
        report, keep = Step(), []
        for row, (sentence, token) in enumerate(zip(self.sentences, chosen.tolist())):
            if token == self.eos_id:
                tokens = self.tokens[sentence]
                score = self.scores[row].item() / length_penalty(len(tokens) + 1, self.alpha)
                report.finished[sentence] = [Hypothesis(tokens, score)]
            else:
                self.tokens[sentence].append(token)
                report.committed[sentence] = [token]
                keep.append(row)
        rows = torch.tensor(keep, dtype=torch.long, device=logprobs.device)
        self.sentences = [self.sentences[r] for r in keep]
        self.scores = self.scores[rows]
        return report, rows, chosen[rows]


class BeamSearch(Strategy):
    """Beam search over a whole batch in tensors: each sentence keeps `beam_size` live
    hypotheses; candidates are ranked by summed log-prob, finished ones by the length-penalised
    score.

    A sentence ends when `beam_size` hypotheses have finished, or when its n-best finished
    ones cannot be beaten by any extension of a live one (log-probs only fall, and the
    penalty's divisor is largest at max_length). Its rows then leave the working batch.

    A sentence starts with one row, its one hypothesis (the empty one), and has `beam_size`
    rows from the first step on, as in CTranslate2: K identical rows took the first step's
    products K times (Intel Xeon with AMX, 2 threads, one process switching: W4 of benchmarks/,
    32 sentences x 4 beams, float32 1.05x and 1.13x, int8 1.01x; one sentence unchanged)."""

    def __init__(self, *, eos_id: int, beam_size: int, max_length: int, alpha: float = 0.0,
                 n_best: int = 1):
        self.eos_id, self.k, self.max_length, self.alpha = eos_id, beam_size, max_length, alpha
        self.n_best = n_best

    def start(self, batch_size: int, device: torch.device) -> Tensor:
        self.sentences = torch.arange(batch_size, device=device)  # (n,) live sentences
        # (n, G) log-prob sums of each sentence's G rows (G = 1 until the first step)
        self.scores = torch.zeros(batch_size, 1, device=device)
        self.history = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # (n*G, t)
        self.finished: list[list[Hypothesis]] = [[] for _ in range(batch_size)]
        self.committed = [0] * batch_size  # tokens of each sentence already reported final
        return self.sentences.clone()

    @property
    def group(self) -> int:
        return self.scores.size(1)

    def step(self, logprobs: Tensor) -> tuple[Step, Tensor, Tensor]:
        K, V = self.k, logprobs.size(-1)
        (n, G), t = self.scores.shape, self.history.size(1)
        # a sentence's 2K best candidates are among each of its rows' 2K best tokens, so the
        # rows' scores are only added to those: (N, W), not (N, V)
        W = min(2 * K, V)
        row_logprobs, row_tokens = largest(logprobs, W)  # (N, W)
        candidates = (self.scores[:, :, None] + row_logprobs.view(n, G, W)).view(n, G * W)
        top_scores, top_index = candidates.topk(min(2 * K, G * W), dim=1)  # (n, 2K)
        origin = top_index // W  # (n, 2K) row of origin within the sentence's
        token = row_tokens.view(n, G * W).gather(1, top_index)  # (n, 2K) next token
        is_eos = token == self.eos_id

        # EOS among the K best candidates ends a hypothesis
        ended = is_eos[:, :K] & (top_scores[:, :K] > NEG_INF)
        for i, j in ended.nonzero().tolist():
            sentence = int(self.sentences[i])
            tokens = self.history[i * G + origin[i, j]].tolist()
            score = top_scores[i, j].item() / length_penalty(t + 1, self.alpha)
            self.finished[sentence].append(Hypothesis(tokens, score))

        # the K best candidates that do not end continue: R rows a sentence from here on, K
        # but where the first step's vocabulary holds fewer than K candidates
        live_scores, pick = top_scores.masked_fill(is_eos, NEG_INF).topk(
            min(K, top_scores.size(1)), dim=1)  # (n, R)
        R = live_scores.size(1)
        rows = (torch.arange(n, device=logprobs.device)[:, None] * G
                + origin.gather(1, pick)).view(-1)  # (n*R,)
        next_tokens = token.gather(1, pick).view(-1)  # (n*R,)
        history = torch.cat([self.history[rows], next_tokens[:, None]], dim=1)  # (n*R, t+1)

        report, keep = Step(), []
        penalty = length_penalty(self.max_length + 1, self.alpha)
        best_possible = (live_scores[:, 0] / penalty).tolist()  # (n,)
        prefix = self.shared_prefix(history.view(n, R, t + 1), live_scores)  # (n,)
        for i, sentence in enumerate(self.sentences.tolist()):
            done = self.finished[sentence]
            done.sort(key=lambda h: -h.score)
            bound = best_possible[i]
            if len(done) >= K or bound == NEG_INF or (
                    len(done) >= self.n_best and done[self.n_best - 1].score >= bound):
                best = done[0].tokens
                report.committed[sentence] = best[self.committed[sentence]:]
                report.finished[sentence] = done[: self.n_best]
                continue
            keep.append(i)
            length = prefix[i]
            for hyp in done:  # a finished hypothesis may still win: commit only what it shares
                length = min(length, common_length(hyp.tokens, history[i * R].tolist()))
            if length > self.committed[sentence]:
                report.committed[sentence] = history[i * R, self.committed[sentence]:length].tolist()
                self.committed[sentence] = length

        if len(keep) == n:  # every sentence goes on (most steps): nothing to select
            self.scores, self.history = live_scores, history
            return report, rows, next_tokens
        kept = torch.tensor(keep, dtype=torch.long, device=logprobs.device)
        kept_rows = (kept[:, None] * R + torch.arange(R, device=kept.device)).view(-1)
        self.sentences, self.scores = self.sentences[kept], live_scores[kept]
        self.history = history[kept_rows]
        return report, rows[kept_rows], next_tokens[kept_rows]

    @staticmethod
    def shared_prefix(history: Tensor, scores: Tensor) -> list[int]:
        """Per sentence, how many leading tokens all its live hypotheses share."""
        alive = (scores > NEG_INF)[:, :, None]  # (n, K, 1)
        same = ((history == history[:, :1]) | ~alive).all(dim=1)  # (n, t)
        return same.long().cumprod(dim=1).sum(dim=1).tolist()


def common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---- options and the registry ------------------------------------------------------------

@dataclass(kw_only=True)
class DecodeOptions:
    """Everything a user can choose about decoding; validated once, up front."""

    strategy: str = "greedy"  # a name in STRATEGIES
    beam_size: int = 5
    length_penalty: float = 0.6  # GNMT alpha; 0 ranks by the plain sum of log-probs
    n_best: int = 1
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int | None = None
    min_length: int = 0  # EOS is forbidden before this many tokens
    max_length: int = 256  # at most this many tokens per sentence (EOS not counted)
    max_length_factor: float = 2.0  # and at most factor x source tokens + 10 (0: no such limit)
    no_repeat_ngram: int = 0  # no n-gram of this size twice in a translation (0: allowed)

    def __post_init__(self) -> None:
        def need(ok: bool, why: str) -> None:
            if not ok:
                raise UsageError(why)

        need(self.strategy in STRATEGIES, f"unknown strategy '{self.strategy}'; "
             f"choose from {', '.join(STRATEGIES)}")
        need(self.beam_size >= 1, f"beam size must be at least 1, got {self.beam_size}")
        need(self.length_penalty >= 0, f"length penalty must be >= 0, got {self.length_penalty}")
        need(self.n_best >= 1, f"n-best must be at least 1, got {self.n_best}")
        need(self.top_k >= 0, f"top-k must be >= 0, got {self.top_k}")
        need(0 < self.top_p <= 1, f"top-p must be in (0, 1], got {self.top_p}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(self.max_length >= 1, f"max length must be at least 1, got {self.max_length}")
        need(self.max_length_factor >= 0,
             f"max length factor must be >= 0, got {self.max_length_factor}")
        need(self.no_repeat_ngram >= 0,
             f"no-repeat n-gram size must be >= 0, got {self.no_repeat_ngram}")
        need(0 <= self.min_length <= self.max_length,
             f"min length must be between 0 and max length ({self.max_length}), "
             f"got {self.min_length}")
        if self.strategy == "beam":
            need(self.n_best <= self.beam_size,
                 f"n-best ({self.n_best}) cannot exceed the beam size ({self.beam_size})")
        else:
            need(self.n_best == 1, "n-best lists need beam search (-s beam)")

    def limit(self, source_tokens: int) -> int:
        """The most tokens a translation of `source_tokens` tokens may have."""
        if not self.max_length_factor:
            return self.max_length
        return max(self.min_length, min(self.max_length,
                                        int(self.max_length_factor * source_tokens) + 10))

    def make(self, eos_id: int) -> Strategy:
        return STRATEGIES[self.strategy](self, eos_id)


STRATEGIES: dict[str, Callable[[DecodeOptions, int], Strategy]] = {
    "greedy": lambda o, eos: Sampling(eos_id=eos, temperature=0.0, alpha=o.length_penalty),
    "sample": lambda o, eos: Sampling(eos_id=eos, temperature=o.temperature, top_k=o.top_k,
                                      top_p=o.top_p, seed=o.seed, alpha=o.length_penalty),
    "beam": lambda o, eos: BeamSearch(eos_id=eos, beam_size=o.beam_size,
                                      max_length=o.max_length, alpha=o.length_penalty,
                                      n_best=o.n_best),
}


# choices of strategy: any of them given replaces the model's own choice
PICKS = ("strategy", "beam_size", "n_best", "top_k", "top_p", "temperature")


def with_defaults(given: dict, defaults: dict) -> dict:
    """Fill the options a user left out (None) from the model's decoding settings (its
    generation.json: Marian's beam search and maximum length, our models' beam and length
    penalty). A user's choice of strategy replaces the model's; the model's beam size still
    applies to beam search chosen without a beam size."""
    merged = {k: defaults[k] if v is None and k in defaults and k not in PICKS else v
              for k, v in given.items()}
    if any(given.get(k) is not None for k in PICKS):
        chosen = combine(**given).strategy
    else:
        chosen = merged["strategy"] = defaults.get("strategy")
    if chosen == "beam" and given.get("beam_size") is None and "beam_size" in defaults:
        merged["beam_size"] = defaults["beam_size"]
    return merged


def combine(*, strategy=None, beam_size=None, n_best=None, top_k=None, top_p=None,
                   temperature=None, **rest):
    """DecodeOptions from what a user gave (None: not given): sampling options imply
    sampling, beam options beam search; contradictions are a UsageError."""
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
