"""The Transformer itself: masks, padding and the KV cache."""

import pytest
import torch

from conftest import tiny_model

from core.cache import MAPPINGS, Mappings
from core.generate import generate
from core.model import dropout, few_query_attention
from core.search import DecodeOptions

VARIANTS = [
    {},  # the paper: post-norm, sinusoidal interleaved, relu, tied output
    {"norm_first": True, "positional": "learned", "activation": "gelu", "tie_output": False},
    {"sinusoid_layout": "halves", "activation": "swish", "final_logits_bias": True,
     "scale_embeddings": False},
]
V = 50


def batch(lengths, seed=0):
    """Right-padded random source ids (B, S) and their mask; ids 4.. are ordinary tokens."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    src = torch.zeros(len(lengths), S, dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(4, V, (n,), generator=g)
    return src, src != 0


@pytest.mark.parametrize("overrides", VARIANTS)
def test_causal_mask_hides_later_target_tokens(overrides):
    """Changing target token j never changes decoder outputs at positions before j."""
    model = tiny_model(V, **overrides)
    src, mask = batch([7])
    tgt = torch.randint(4, V, (1, 9))
    changed = tgt.clone()
    changed[0, 5:] = torch.randint(4, V, (4,))
    a, b = model(src, mask, tgt), model(src, mask, changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("overrides", VARIANTS)
def test_padded_batch_equals_each_sentence_alone(overrides):
    """Padding on the source and target side changes nothing for the real positions."""
    model = tiny_model(V, **overrides)
    src_lengths, tgt_lengths = [3, 8, 5], [6, 2, 4]
    src, mask = batch(src_lengths, seed=1)
    tgt, _ = batch(tgt_lengths, seed=2)
    together = model(src, mask, tgt)
    for i, (s, t) in enumerate(zip(src_lengths, tgt_lengths)):
        alone = model(src[i: i + 1, :s], mask[i: i + 1, :s], tgt[i: i + 1, :t])
        torch.testing.assert_close(together[i: i + 1, :t], alone, atol=1e-5, rtol=1e-5)


def test_the_encoder_computes_only_real_tokens():
    """Its products see the real tokens' rows, not the padding, which comes out as zeros."""
    model = tiny_model(V).eval()
    src, mask = batch([3, 8, 5], seed=4)
    rows = []
    model.encoder[0].ffn.fc1.register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    memory = model.encode(src, mask)
    assert rows == [(3 + 8 + 5, model.cfg.d_model)]
    assert memory[~mask].abs().sum() == 0 and memory[mask].abs().sum() > 0


@pytest.mark.parametrize("overrides", VARIANTS)
def test_cached_decoding_equals_recomputing_the_prefix(overrides):
    """decode_step with the KV cache gives the logits of a full teacher-forced pass."""
    model = tiny_model(V, **overrides)
    src, mask = batch([4, 9], seed=3)
    tgt = torch.randint(4, V, (2, 7))
    full = model(src, mask, tgt)  # (B, T, V)
    memory = model.encode(src, mask)
    cache = model.new_cache(memory, mask)
    # float32 sums in another order differ by ~1e-7 of the logits' scale, more on some CPUs
    # (2.4e-5 seen on an AMD EPYC); a cache bug (wrong position, stale K/V) is off by ~scale
    scale = full.abs().amax().item()
    for t in range(tgt.size(1)):
        logits, cache = model.decode_step(tgt[:, t], cache)
        torch.testing.assert_close(logits, full[:, t], atol=1e-5 * max(scale, 1), rtol=1e-4)
    assert cache.length == tgt.size(1)


def test_cache_reorder_follows_rows():
    """reorder() gives each row the K/V of the row it came from, so beams keep their history;
    the cache it reorders is spent (its buffers moved, not copied beside it)."""
    model = tiny_model(V)
    src, mask = batch([5, 6], seed=4)
    tokens = torch.tensor([7, 8])

    def after_three_steps():
        cache = model.new_cache(model.encode(src, mask), mask)
        for _ in range(3):
            _, cache = model.decode_step(tokens, cache)
        return cache

    spent = after_three_steps()
    swapped = spent.reorder(torch.tensor([1, 0, 0]))
    assert not spent.self_k and not spent.self_v
    logits_swapped, _ = model.decode_step(torch.tensor([8, 7, 7]), swapped)
    permuted = after_three_steps().reorder(torch.tensor([1, 0]))  # as many rows, other sentences
    logits_permuted, _ = model.decode_step(torch.tensor([8, 7]), permuted)
    logits, _ = model.decode_step(tokens, after_three_steps())
    torch.testing.assert_close(logits_swapped, logits[[1, 0, 0]])
    torch.testing.assert_close(logits_permuted, logits[[1, 0]])


def test_beam_steps_reuse_the_cache_memory():
    """Step after step of reordering (beams swapping), the self-attention K/V move between the
    same buffers: no step allocates a new set, which glibc would keep as peak memory."""
    model = tiny_model(V)
    src, mask = batch([5, 6], seed=4)
    cache = model.new_cache(model.encode(src, mask), mask, group=2)
    swap = torch.tensor([1, 0, 3, 2])

    def storages(c):
        return {t.untyped_storage().data_ptr() for t in [*c.self_k, *c.self_v, c.spare]}

    seen = []
    for t in range(6):  # within the first buffer's capacity (16)
        logits, cache = model.decode_step(torch.full((4,), 7 + t), cache)
        cache = cache.reorder(swap)
        seen.append(storages(cache))
    assert all(s == seen[1] for s in seen[1:])  # the first reorder allocated the one spare
    assert len(seen[1]) == 2 * len(model.decoder) + 1


def test_a_reorder_lays_the_cache_out_tight_for_the_next_step():
    """After beams move, each layer's self-attention K/V for the next step sit in one stretch
    of memory, no gap between one (row, head)'s positions and the next's: attention reads
    them 2-3x faster than a buffer's first positions."""
    model = tiny_model(V)
    src, mask = batch([5, 6], seed=4)
    cache = model.new_cache(model.encode(src, mask), mask, group=2)
    for t in range(20):  # past the first buffer's capacity (16)
        logits, cache = model.decode_step(torch.full((4,), 7 + t), cache)
        cache = cache.reorder(torch.tensor([1, 0, 3, 2]))
        for buffer in [*cache.self_k, *cache.self_v]:  # the positions so far and the next's
            assert buffer.is_contiguous() and buffer.size(2) == cache.length + 1 == t + 2


def test_cache_memory_is_reused_once_no_tensor_holds_it():
    """The cache's buffers come from kept mappings (core.cache.Mappings): one whose tensors are
    all gone goes out again, never one that a tensor or a view of it still holds; and one too
    small for a growing buffer is given back rather than kept beside it."""
    mappings, like = Mappings(), torch.empty(0)
    first = mappings.take((1000,), like, 0).fill_(1.0)
    view, address = first[10:20], first.data_ptr()
    del first
    second = mappings.take((1000,), like, 0).fill_(2.0)
    assert second.data_ptr() != address and view.eq(1.0).all()
    del view
    assert mappings.take((500,), like, 0).data_ptr() == address  # freed, and it fits
    del second
    grown = mappings.take((4000,), like, 0)  # fits none: the two free ones are given back
    assert len(mappings.kept) == 1 and grown.untyped_storage().nbytes() == 16000


def test_decoding_in_reused_cache_memory_reads_nothing_left_in_it():
    """Kept cache memory comes back as it was left (here: NaN everywhere); beam search in it
    gives the same as in fresh memory, so no position is read before it is written."""
    model = tiny_model(V)
    src, mask = batch([5, 6, 3], seed=4)
    options = DecodeOptions(strategy="beam", beam_size=3, max_length=20)

    def translate():
        return [step.finished for step in generate(model, src, mask, options.make(model.cfg.eos_id),
                                                   max_length=20)]

    fresh = translate()
    for i in range(len(MAPPINGS.kept)):
        if MAPPINGS.refs(i) == MAPPINGS.alone:  # free: poison it
            torch.frombuffer(MAPPINGS.kept[i], dtype=torch.uint8).fill_(255)  # float NaN
    assert translate() == fresh


def test_beams_sharing_one_cross_attention_copy_equal_separate_copies():
    """Rows grouped per sentence (beams) read one copy of the sentence's cross-attention K/V:
    over more steps than the first cache buffer holds, with beams swapping and a sentence
    leaving, the logits equal those of a cache where every row has its own copy."""
    model = tiny_model(V)
    src, mask = batch([5, 7, 6], seed=5)
    memory = model.encode(src, mask)
    shared = model.new_cache(memory, mask, group=2)
    copies = model.new_cache(memory.repeat_interleave(2, 0), mask.repeat_interleave(2, 0))
    g = torch.Generator().manual_seed(6)
    for t in range(20):
        rows = torch.arange(shared.self_k[0].size(0))
        if t == 9:  # the middle sentence leaves
            rows = torch.tensor([0, 1, 4, 5])
        elif t % 3 == 1:  # beams swap and repeat within their sentence
            rows = rows.view(-1, 2).flip(1).reshape(-1)
            rows[0] = rows[1]
        shared, copies = shared.reorder(rows), copies.reorder(rows)
        tokens = torch.randint(4, V, (rows.numel(),), generator=g)
        a, shared = model.decode_step(tokens, shared)
        b, copies = model.decode_step(tokens, copies)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert shared.cross_k[0].size(0) == 2 and copies.cross_k[0].size(0) == 4


@pytest.mark.parametrize("overrides, biases", [(VARIANTS[0], True), (VARIANTS[1], True),
                                               (VARIANTS[2], False)])
def test_folded_cross_attention_equals_the_plain_one(overrides, biases):
    """Cross-attention K/V folded through the query and output projections give the logits
    of the plain ones, over padded sources, beams swapping and a sentence leaving."""
    model = tiny_model(V, **overrides)
    for layer in model.decoder:  # biases start at zero: give them values, or take them away
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear = getattr(layer.cross_attn, proj)
            if biases:
                torch.nn.init.normal_(linear.bias, std=0.5)
            else:
                linear.bias = None
    src, mask = batch([5, 7, 3], seed=7)
    memory = model.encode(src, mask)
    folded = model.new_cache(memory, mask, group=2, fold=True)
    plain = model.new_cache(memory, mask, group=2, fold=False)
    assert folded.cross_bias is not None and plain.cross_bias is None
    g = torch.Generator().manual_seed(8)
    for t in range(6):
        rows = torch.arange(folded.self_k[0].size(0))
        if t == 3:  # the middle sentence leaves
            rows = torch.tensor([0, 1, 4, 5])
        elif t % 2:  # beams swap
            rows = rows.view(-1, 2).flip(1).reshape(-1)
        folded, plain = folded.reorder(rows), plain.reorder(rows)
        tokens = torch.randint(4, V, (rows.numel(),), generator=g)
        a, folded = model.decode_step(tokens, folded)
        b, plain = model.decode_step(tokens, plain)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert folded.cross_k[0].size(0) == 2


def test_a_short_sentence_folds_where_the_model_says():
    """new_cache folds by itself only where `fold_source` is set, for K/V of at most half the
    two projections' bytes (B H S <= D / 2), greedily or with beams."""
    model = tiny_model(V)  # D 32, 4 heads: up to 4 source tokens for one sentence

    def folds(lengths, group=1):
        src, mask = batch(lengths)
        return model.new_cache(model.encode(src, mask), mask, group=group).cross_bias is not None

    assert not folds([4])
    model.fold_source = True
    assert folds([4]) and folds([2, 2])
    assert folds([4], group=2) and folds([2, 2], group=4)
    assert not folds([5]) and not folds([3, 3]) and not folds([5], group=2)


@pytest.mark.parametrize("queries, keys", [(1, 1), (1, 13), (4, 30), (16, 16)])
def test_few_query_attention_equals_the_fused_kernel(queries, keys):
    """The plain products that decoding steps use give torch's fused attention, masks and all."""
    g = torch.Generator().manual_seed(queries * 100 + keys)
    q, k, v = (torch.randn(3, 4, n, 8, generator=g) for n in (queries, keys, keys))
    mask = torch.ones(3, 1, 1, keys, dtype=torch.bool)
    mask[1, ..., keys // 2 + 1:] = False  # a padded source
    causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
    for m in (None, mask, causal):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
        torch.testing.assert_close(few_query_attention(q, k, v, m), want, atol=1e-5, rtol=1e-4)


def test_too_long_input_is_a_clear_error():
    model = tiny_model(V, max_positions=8)
    src, mask = batch([9])
    with pytest.raises(ValueError, match="longer than the model's maximum"):
        model.encode(src, mask)


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_zeroes_a_fraction_p_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    x = torch.ones(200, 1000, requires_grad=True)
    y = dropout(x, p, training=True)
    zeroed = (y == 0).float().mean().item()
    assert abs(zeroed - p) < 0.01
    assert abs(y.mean().item() - 1.0) < 0.01  # kept values are scaled up by 1 / (1 - p)
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)  # no gradient through dropped units
    assert dropout(x, p, training=False) is x
