"""The Transformer encoder-decoder of "Attention Is All You Need" (Vaswani et al., 2017).

Dimensions:
    B  sentences in a batch           N  decoder rows (B, or B * beam size)
    S  source length                  T  target length (t: positions decoded so far)
    D  d_model                        H  attention heads, Dh = D / H
    F  feed-forward inner width       V  vocabulary size
    R  real (not padding) source tokens of a batch, as rows

Masks are boolean and True where attention is allowed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.cache import KVCache, outside_heap
from core.config import ModelConfig

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}


class Embeddings(nn.Module):
    """Token embeddings, scaled by sqrt(D) where configured."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.weight) * self.scale  # (B, T, D)


def sinusoid_table(n_positions: int, d: int, layout: str) -> Tensor:
    """sin/cos of position * 10000^(-2i/D): interleaved (paper) or sines then cosines (Marian)."""
    # on the CPU even while a model is built on the meta device: the table is never loaded
    position = torch.arange(n_positions, dtype=torch.float64, device="cpu")[:, None]  # (P, 1)
    inv_freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float64, device="cpu")
                         * (-math.log(10000.0) / d))  # (D/2,)
    angles = position * inv_freq  # (P, D/2)
    table = torch.empty(n_positions, d, dtype=torch.float64, device="cpu")
    if layout == "interleaved":
        table[:, 0::2], table[:, 1::2] = angles.sin(), angles.cos()
    else:
        table[:, : d // 2], table[:, d // 2:] = angles.sin(), angles.cos()
    return table.float()  # (P, D)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout, while training (else x itself). On the CPU the mask comes from random
    bytes, keeping 256 - round(256p) of every 256: half the time of torch's bernoulli mask
    (forward and backward, 2.6 vs 5.2 ms for a 150 x 15 x 256 batch on 2 cores). A function,
    not a module: every sub-layer's output passes through it, 24 times a decoding step of a
    6-layer decoder, and a module's call took 5.8 us to return x (Zen 4 EPYC)."""
    if not training or p == 0.0:
        return x
    drop = round(p * 256)
    if x.device.type != "cpu" or not 0 < drop < 256:
        return F.dropout(x, p, training=True)
    keep = torch.empty(x.shape, dtype=torch.uint8).random_().ge_(drop)
    return x * keep.to(x.dtype).mul_(256 / (256 - drop))


class PositionalEncoding(nn.Module):
    """Adds a fixed sinusoidal or a learned vector for each position."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.learned = cfg.positional == "learned"
        if self.learned:
            self.weight = nn.Parameter(torch.empty(cfg.max_positions, cfg.d_model))
        else:  # not a parameter and not saved: it is a function of the config
            table = sinusoid_table(cfg.max_positions, cfg.d_model, cfg.sinusoid_layout)
            self.register_buffer("weight", table, persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        T = x.size(1)
        if offset + T > self.weight.size(0):
            raise ValueError(f"sequence of {offset + T} positions is longer than the model's "
                             f"maximum of {self.weight.size(0)}")
        return x + self.weight[offset: offset + T]  # (B, T, D)


FEW_QUERIES = 16  # up to this many query positions per row, CPU inference computes attention
# with plain products: torch's fused CPU kernel pays a fixed cost per (row, head) block that
# dominates at a decoding step's sizes (128 beam rows x 8 heads, 1 query over 16 keys: 0.27 ms
# fused, 0.19 plain; 32 sentences, 4 beams' queries over 30 source tokens: 0.65 and 0.22 ms;
# AMD EPYC Zen 4, 2 threads). Past that, the fused kernel, which never holds the score matrix.
FUSED_BLOCKS = 64  # up to this many (row, head) blocks, the fused kernel all the same: one call
# where the plain products take five, and their fixed costs dominate (1 row of 8 heads over 20
# keys: 16 us fused, 29-33 plain; 8 rows over 30: 43-65 fused, 65-70 plain; 16 rows over 30
# on one thread: 169 fused, 155 plain; Zen 3 EPYC). One sentence greedily or in a beam of 4 of
# benchmarks/: int8 1.05-1.06x as fast, float32 1.01x.


def attention_probs(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(Dh)), masked: each query's weights over the keys (B, H, T, L)."""
    scores = q @ k.transpose(-1, -2) * q.size(-1) ** -0.5  # (B, H, T, L)
    if mask is not None:
        scores.masked_fill_(mask.logical_not(), float("-inf"))
    return torch.softmax(scores, -1)  # (B, H, T, L)


def few_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) v with the scores materialised: (B, H, T, Dh)."""
    return attention_probs(q, k, mask) @ v  # (B, H, T, Dh)


class Padding:
    """Where a batch's R real tokens sit among its (B, S) padded positions. The encoder keeps
    only the real ones, as rows (R, D), and lays them out padded for attention alone: every
    product then skips the padding (a third of a 32-sentence batch's positions, sorted by
    length, where sentences run 8-21 tokens)."""

    def __init__(self, mask: Tensor):
        self.shape = mask.shape  # (B, S)
        # None: no padding, and (B, S, D) <-> (R, D) are views
        self.index = None if bool(mask.all()) else mask.flatten().nonzero()[:, 0]  # (R,)

    def pack(self, x: Tensor) -> Tensor:
        """(B, S, E) -> (R, E): the real tokens' rows."""
        x = x.flatten(0, 1)  # (B * S, E)
        return x if self.index is None else x.index_select(0, self.index)

    def unpack(self, x: Tensor) -> Tensor:
        """(R, E) -> (B, S, E), zeros at the padding."""
        if self.index is not None:
            x = x.new_zeros(self.shape.numel(), x.size(-1)).index_copy_(0, self.index, x)
        return x.view(*self.shape, x.size(-1))  # (B, S, E)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over H heads; queries, keys and values are projected
    apart from attending, so a cache can keep keys and values."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.dh = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.attention_dropout
        # q_proj, k_proj and v_proj as one product (3D, D), where inference fused them
        # (core.precision): self-attention's q, k and v then come from it
        self.qkv: nn.Module | None = None

    def split(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.h, self.dh).transpose(1, 2)  # (B, H, T, Dh)

    def project_q(self, x: Tensor) -> Tensor:
        return self.split(self.q_proj(x))  # (B, H, T, Dh)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.k_proj(x)), self.split(self.v_proj(x))  # 2 x (B, H, L, Dh)

    def project_qkv(self, x: Tensor, padding: Padding | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention's queries, keys and values, all of x (B, T, D), or of the real
        tokens' rows (R, D) of `padding`: 3 x (B, H, T, Dh)."""
        unpack = padding.unpack if padding is not None else lambda t: t
        if self.qkv is None:
            q, k, v = (unpack(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        else:
            q, k, v = unpack(self.qkv(x)).chunk(3, -1)  # 3 x (B, T, D), views
            # q laid out as q_proj's own output: a decoding step's (N, H, 1, Dh) is then
            # contiguous, which its attention's batched products read faster (128 rows of 8
            # heads: 0.11 ms against 0.20 for q @ k^T, where copying q takes 0.01)
            q = q.contiguous()
        return self.split(q), self.split(k), self.split(v)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                padding: Padding | None = None) -> Tensor:
        """Attend with projected queries (B, H, T, Dh) over keys and values (B, H, L, Dh):
        (B, T, D), or the real tokens' rows (R, D) of `padding`."""
        if (self.training or q.device.type != "cpu" or q.size(2) > FEW_QUERIES
                or q.size(0) * q.size(1) <= FUSED_BLOCKS):
            p = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            out = few_query_attention(q, k, v, mask)  # (B, H, T, Dh)
        B, _, T, _ = out.shape
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, D)
        return self.out_proj(out if padding is None else padding.pack(out))  # (B, T, D) or (R, D)

    def fold(self, k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keys and values (B, H, S, Dh) carried through the query and the output projection
        (Wq_h^T k / sqrt(Dh) and Wo_h v per head h), so that attending from x takes neither:
        scores = x a^T + c, output = softmax per head (scores) b + out bias. Returns a and b
        (B, H*S, D), and c (B, 1, H*S), the query bias's part of the scores, -inf at the
        padding of `mask` (B, 1, 1, S)."""
        B, H, S, Dh = k.shape
        wq = weight_of(self.q_proj).view(H, Dh, -1)  # (H, Dh, D)
        wo = weight_of(self.out_proj).view(-1, H, Dh).permute(1, 2, 0)  # (H, Dh, D)
        bq, scale = self.q_proj.bias, Dh ** -0.5
        a = (k @ wq).mul_(scale).view(B, H * S, -1)  # (B, H*S, D)
        c = k.new_zeros(B, H, S, 1) if bq is None else (k @ bq.view(H, Dh, 1)).mul_(scale)
        c.masked_fill_(mask.logical_not().view(B, 1, S, 1), float("-inf"))  # (B, H, S, 1)
        return a, c.view(B, 1, H * S), (v @ wo).view(B, H * S, -1)

    def attend_folded(self, x: Tensor, a: Tensor, c: Tensor, b: Tensor) -> Tensor:
        """Attend from x (B, T, D) with keys and values of fold(): (B, T, D)."""
        B, T, _ = x.shape
        scores = torch.baddbmm(c, x, a.transpose(1, 2))  # (B, T, H*S)
        probs = scores.view(B, T, self.h, -1).softmax(-1).view(B, T, -1)  # (B, T, H*S)
        bias = self.out_proj.bias
        return torch.bmm(probs, b) if bias is None else torch.baddbmm(bias, probs, b)  # (B, T, D)


def weight_of(linear: nn.Module) -> Tensor:
    """A linear layer's weight (out, in) as a matrix, in whatever layout inference keeps it."""
    return linear.matrix() if hasattr(linear, "matrix") else linear.weight


class FeedForward(nn.Module):
    """Position-wise feed-forward network: linear, activation, linear."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.act = ACTIVATIONS[cfg.activation]
        self.dropout = cfg.activation_dropout

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(dropout(self.act(self.fc1(x)), self.dropout, self.training))  # (B, T, D)


class AddNorm(nn.Module):
    """Residual connection and layer norm, after the sub-layer (paper) or before it (pre-norm)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout = cfg.dropout
        self.norm_first = cfg.norm_first

    def forward(self, x: Tensor, sublayer) -> Tensor:
        if self.norm_first:
            return x + dropout(sublayer(self.norm(x)), self.dropout, self.training)
        return self.norm(x + dropout(sublayer(x), self.dropout, self.training))


class EncoderLayer(nn.Module):
    """Self-attention over the source, then feed-forward, each wrapped in add & norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn, self.ffn = MultiHeadAttention(cfg), FeedForward(cfg)
        self.add_norm1, self.add_norm2 = AddNorm(cfg), AddNorm(cfg)

    def forward(self, x: Tensor, mask: Tensor, padding: Padding) -> Tensor:
        """The real tokens' rows (R, D) of `padding`, through the layer."""
        def attend(h: Tensor) -> Tensor:
            return self.self_attn(*self.self_attn.project_qkv(h, padding), mask, padding)

        x = self.add_norm1(x, attend)
        return self.add_norm2(x, self.ffn)  # (R, D)


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder output, then feed-forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn, self.cross_attn = MultiHeadAttention(cfg), MultiHeadAttention(cfg)
        self.ffn = FeedForward(cfg)
        self.add_norm1, self.add_norm2, self.add_norm3 = AddNorm(cfg), AddNorm(cfg), AddNorm(cfg)

    def forward(self, x: Tensor, self_mask: Tensor | None, cross_kv: tuple[Tensor, Tensor],
                cross_mask: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        def attend_self(h: Tensor) -> Tensor:
            q, k, v = self.self_attn.project_qkv(h)  # (N, H, T, Dh)
            if cache is not None:
                k, v = cache.append(layer, k, v)  # (N, H, t+1, Dh)
            return self.self_attn(q, k, v, self_mask)

        def attend_source(h: Tensor) -> Tensor:
            # the `group` rows of a sentence (its beams) become query positions of one row, so
            # they all read the sentence's single copy of the cross-attention K/V
            N, T, D = h.shape
            group = cache.group if cache is not None else 1
            h = h.reshape(N // group, group * T, D)
            if cache is not None and cache.cross_bias is not None:
                a, b = cross_kv
                out = self.cross_attn.attend_folded(h, a, cache.cross_bias[layer], b)
            else:
                out = self.cross_attn(self.cross_attn.project_q(h), *cross_kv, cross_mask)
            return out.view(N, T, D)  # out: (N / group, group * T, D)

        x = self.add_norm1(x, attend_self)
        x = self.add_norm2(x, attend_source)
        return self.add_norm3(x, self.ffn)  # (N, T, D)


class Transformer(nn.Module):
    """Encoder-decoder with a final linear layer (tied to the embeddings where configured)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.positions = PositionalEncoding(cfg)
        self.dropout = cfg.dropout
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        # pre-norm leaves the residual stream un-normalised: one norm closes each stack
        self.encoder_norm = nn.LayerNorm(cfg.d_model, cfg.layer_norm_eps) if cfg.norm_first else None
        self.decoder_norm = nn.LayerNorm(cfg.d_model, cfg.layer_norm_eps) if cfg.norm_first else None
        self.lm_head = None if cfg.tie_output else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.logits_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.final_logits_bias else None
        self.tied_linear = F.linear  # the tied output's product (core.precision may pick another)
        # whether new_cache may fold the cross-attention K/V (it decides per batch); set by
        # core.precision for float32 on a CPU, where a decoding step's products wait on memory
        self.fold_source = False
        if not self.embed.weight.is_meta:  # built on the meta device, it awaits stored weights
            self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        # with sqrt(D) scaling, N(0, D^-1/2) embeddings start at unit scale, like the positions
        nn.init.normal_(self.embed.weight, std=self.cfg.d_model ** -0.5)

    def embed_tokens(self, tokens: Tensor, offset: int = 0) -> Tensor:
        return dropout(self.positions(self.embed(tokens), offset), self.dropout,
                       self.training)  # (B, T, D)

    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor:
        """Run the encoder once: (B, S) token ids and (B, S) real-token mask -> (B, S, D)."""
        mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        padding = Padding(src_mask)
        x = padding.pack(self.embed_tokens(src))  # (R, D) the real tokens only
        for layer in self.encoder:
            x = layer(x, mask, padding)
        if self.encoder_norm is not None:
            x = self.encoder_norm(x)
        return padding.unpack(x)  # (B, S, D), zeros at the padding

    def new_cache(self, memory: Tensor, src_mask: Tensor, group: int = 1,
                  fold: bool | None = None) -> KVCache:
        """Project the encoder output into every layer's cross-attention K/V, once; give each
        sentence `group` decoder rows (its beams) with empty self-attention K/V. Fold the
        cross K/V (MultiHeadAttention.fold) if `fold`, or, left None, where `fold_source` is
        set and the folded K/V are at most half the bytes of the query and output projections'
        weights (B H S <= D / 2: one sentence of up to 32 tokens, for D 512 and 8 heads),
        whatever the rows per sentence. A decoding step then reads them in two products in
        place of those four. One sentence of 20 tokens, greedy: 10-12% faster (Zen 4 EPYC);
        beam 4: 0.97-1.05x (Zen 4), 1.05-1.08x (Zen 3 EPYC, where 4-row products are slow).
        Folded all the same, one sentence of 60 tokens or beam search over 40 ran 1-5% slower
        (Zen 4)."""
        (B, S, D), H = memory.shape, self.cfg.n_heads
        if fold is None:
            fold = self.fold_source and B * H * S <= D // 2
        mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        cross_k, cross_v, cross_bias = [], [], []
        for layer in self.decoder:
            k, v = layer.cross_attn.project_kv(memory)  # 2 x (B, H, S, Dh)
            if fold:
                k, c, v = layer.cross_attn.fold(k, v, mask)  # (B, H*S, D), (B, 1, H*S)
                cross_bias.append(c)
            # contiguous, once: a transposed view's (B, H) do not flatten into one batch of
            # matrix products, so every step would copy them (14% of a 32-sentence batch's time)
            cross_k.append(k.contiguous())
            cross_v.append(v.contiguous())
        buffers = [outside_heap((B * group, H, 16, D // H), memory)
                   for _ in range(2 * len(self.decoder))]
        return KVCache(self_k=buffers[0::2], self_v=buffers[1::2], cross_k=cross_k,
                       cross_v=cross_v, memory_mask=mask, group=group,
                       cross_bias=cross_bias if fold else None)

    def project(self, x: Tensor) -> Tensor:
        head = self.lm_head  # a module when untied (or quantized)
        if head is None:  # tied: the embedding matrix, the bias added inside the matrix product
            return self.tied_linear(x, self.embed.weight, self.logits_bias)  # (..., V)
        logits = head(x)  # (..., V)
        return logits + self.logits_bias if self.logits_bias is not None else logits

    def decode_step(self, tokens: Tensor, cache: KVCache) -> tuple[Tensor, KVCache]:
        """Advance every row by one position: (N,) last tokens -> (N, V) next-token logits.

        The cache gains this position's self-attention K/V; the new position sees all cached
        ones, so no causal mask is needed."""
        x = self.embed_tokens(tokens[:, None], offset=cache.length)  # (N, 1, D)
        for i, layer in enumerate(self.decoder):
            x = layer(x, None, (cache.cross_k[i], cache.cross_v[i]), cache.memory_mask, cache, i)
        cache.length += 1
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        return self.project(x[:, 0]), cache  # (N, V)

    def decode(self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """Teacher-forced decoder over a whole target prefix: (B, T) -> (B, T, V)."""
        T = tgt_in.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=tgt_in.device).tril()  # (T, T)
        # pad positions only ever follow real ones, so the causal mask already hides them
        # from every real query; their own outputs are ignored by the loss
        x = self.embed_tokens(tgt_in)
        cross_mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.decoder:
            x = layer(x, causal, layer.cross_attn.project_kv(memory), cross_mask)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        return self.project(x)  # (B, T, V)

    def forward(self, src: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        return self.decode(tgt_in, self.encode(src, src_mask), src_mask)  # (B, T, V)
