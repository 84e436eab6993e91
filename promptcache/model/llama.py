"""Llama-family decoder (Llama 1/2/3, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache, in plain torch.

Weights are fused at load time (q|k|v into one matrix, gate|up into another) so a layer is four products. Every
matrix is stored as the checkpoint has it, ``[out, in]``, dense or quantized (``quant.QWeight``): one layout for
both, and the one the decode kernels want (each output is a dot product over contiguous memory). The layer is two
functions around attention (``attn_in``, ``attn_out``) that take its weights as arguments, so the compiled decode
step (``kernels.CompiledDecode``) traces one graph that every layer shares.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from promptcache.model import kernels
from promptcache.model.attention import paged_attention
from promptcache.model.config import ModelConfig
from promptcache.model.context import ForwardContext
from promptcache.model.kernels import DEFAULT_BUCKETS, CompiledDecode
from promptcache.model.quant import QWeight, Transposed, dequantize, linear, take_rows

Matrix = torch.Tensor | QWeight | Transposed  # an [out, in] matrix, dense or quantized (or a dense one [in, out])
LAYER_MATRICES = ("qkv", "o", "gate_up", "down")  # each layer's projections (dense, quantized or transposed)


def set_matrix(owner: nn.Module, name: str, value: Matrix) -> None:
    """Replace a matrix attribute, which may still be the registered dense Parameter it started as."""
    if name in owner._parameters:
        delattr(owner, name)  # a registered Parameter cannot be reassigned to something else
    setattr(owner, name, value)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as the reference implementation does."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; x [T, heads, D], cos/sin [T, 1, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LayerSpec(NamedTuple):
    """The static shape of every layer of a model (a constant to the compiled graphs, shared by all layers)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    intermediate_size: int


class LayerWeights(NamedTuple):
    """One layer's tensors, passed to the (compiled) layer functions as arguments so all layers share a graph."""

    input_norm: torch.Tensor
    qkv: Matrix
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: Matrix
    post_norm: torch.Tensor
    gate_up: Matrix
    down: Matrix


def attn_in(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w: LayerWeights, spec: LayerSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm, fused q/k/v projection, (Qwen3) q/k norms and RoPE: q [T, H, D], k and v [T, KVH, D]."""
    t = x.shape[0]
    nq, nkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    q_size, kv_size = nq * d, nkv * d
    qkv = linear(_rms_norm(x, w.input_norm, spec.eps), w.qkv, w.qkv_bias)
    v = qkv[:, q_size + kv_size :].view(t, nkv, d)
    if w.q_norm is None:
        # q and k share one RoPE call: their heads sit side by side in the fused projection.
        qk = _rope(qkv[:, : q_size + kv_size].view(t, nq + nkv, d), cos, sin)
        return qk[:, :nq], qk[:, nq:], v
    q = _rope(_rms_norm(qkv[:, :q_size].view(t, nq, d), w.q_norm, spec.eps), cos, sin)
    k = qkv[:, q_size : q_size + kv_size].view(t, nkv, d)
    assert w.k_norm is not None
    return q, _rope(_rms_norm(k, w.k_norm, spec.eps), cos, sin), v


def attn_out(x: torch.Tensor, attn: torch.Tensor, w: LayerWeights, spec: LayerSpec) -> torch.Tensor:
    """Output projection and residual, then norm, SwiGLU MLP and residual."""
    x = x + linear(attn, w.o)
    gate_up = linear(_rms_norm(x, w.post_norm, spec.eps), w.gate_up)  # [T, 2I]: gate, then up
    gate, up = gate_up[:, : spec.intermediate_size], gate_up[:, spec.intermediate_size :]
    return x + linear(F.silu(gate) * up, w.down)


def final_logits(hidden: torch.Tensor, norm: torch.Tensor, lm_head: Matrix, eps: float) -> torch.Tensor:
    """Logits in float32 of selected rows (the final norm is row-wise, so it is applied here)."""
    return linear(_rms_norm(hidden, norm, eps), lm_head).float()


class DecoderLayer(nn.Module):
    """One layer's weights. Matrices start dense ``[out, in]``; the loader may replace them with ``QWeight``s."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        q_size, kv_size = cfg.num_heads * d, cfg.num_kv_heads * d

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.input_norm = param(h)
        self.qkv: Matrix = param(q_size + 2 * kv_size, h)  # q rows, then k, then v
        self.qkv_bias = param(q_size + 2 * kv_size) if cfg.attention_bias else None
        self.q_norm = param(d) if cfg.qk_norm else None
        self.k_norm = param(d) if cfg.qk_norm else None
        self.o: Matrix = param(h, q_size)
        self.post_norm = param(h)
        self.gate_up: Matrix = param(2 * cfg.intermediate_size, h)  # gate rows, then up
        self.down: Matrix = param(h, cfg.intermediate_size)

    def weights(self) -> LayerWeights:
        return LayerWeights(
            self.input_norm, self.qkv, self.qkv_bias, self.q_norm, self.k_norm, self.o, self.post_norm,
            self.gate_up, self.down,
        )  # fmt: skip


class LlamaForCausalLM(nn.Module):
    """The decoder stack plus embeddings and LM head; ``forward`` returns hidden states of the new tokens."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_len: int):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.spec = LayerSpec(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.intermediate_size)
        self.lm_head: Matrix = nn.Parameter(
            torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.embed: torch.Tensor | None = None  # None: tied to the LM head (see ``embed_tokens``)
        if not cfg.tie_word_embeddings:
            self.embed = nn.Parameter(
                torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False
            )
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
        # RoPE tables for every position we can serve, computed in float32 then cast, as the reference does.
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * cfg.inv_freq()[None, :]
        self.register_buffer("cos", freqs.cos().to(dtype).to(device)[:, None, :], persistent=False)
        self.register_buffer("sin", freqs.sin().to(dtype).to(device)[:, None, :], persistent=False)
        self.compiled: CompiledDecode | None = None

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of ``input_ids`` [T] -> [T, hidden]."""
        if self.embed is not None:
            return F.embedding(input_ids, self.embed)
        head = self.lm_head
        if isinstance(head, QWeight):  # tied and quantized: dequantize just the looked-up rows
            return dequantize(take_rows(head, input_ids), self.dtype)
        # NOTE: tied embeddings are one matrix: the LM head's [vocab, hidden] rows are the embedding, which saves
        # a vocab x hidden copy (113 MB for SmolLM2).
        return F.embedding(input_ids, head.t.t() if isinstance(head, Transposed) else head)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext, kv_cache: torch.Tensor) -> torch.Tensor:
        """input_ids [T]; kv_cache [layers, 2, slots, kv_heads, head_dim]. Returns hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.cos[ctx.positions], self.sin[ctx.positions]
        t = x.shape[0]
        if self.compiled is not None and ctx.num_decode == t and not ctx.prefills:
            bucket = self.compiled.bucket(t)
            if bucket is not None:
                try:
                    return self._decode_compiled(x, cos, sin, kv_cache, ctx, bucket)
                except Exception as exc:  # e.g. no C++ toolchain: the step reruns eagerly (same slots rewritten)
                    self.compiled.fail(exc)
        for i, layer in enumerate(self.layers):
            w = layer.weights()
            q, k, v = attn_in(x, cos, sin, w, self.spec)
            attn = paged_attention(q, k, v, kv_cache[i, 0], kv_cache[i, 1], ctx)
            x = attn_out(x, attn, w, self.spec)
        return x

    def _decode_compiled(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, ctx: ForwardContext,
        bucket: int,
    ) -> torch.Tensor:  # fmt: skip
        """The decode-only step through the compiled layer halves, padded to ``bucket`` rows (padding rows are
        computed and dropped; they never reach attention, so they write no KV)."""
        c = self.compiled
        assert c is not None
        t = x.shape[0]
        x, cos, sin = _pad(x, bucket), _pad(cos, bucket), _pad(sin, bucket)
        for i, layer in enumerate(self.layers):
            w = layer.weights()
            q, k, v = c.attn_in(x, cos, sin, w, self.spec)
            attn = paged_attention(q[:t], k[:t], v[:t], kv_cache[i, 0], kv_cache[i, 1], ctx)
            x = c.attn_out(x, _pad(attn, bucket), w, self.spec)
        return x[:t]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in float32 for selected rows of hidden states."""
        c = self.compiled
        bucket = None if c is None else c.bucket(hidden.shape[0])
        if c is not None and bucket is not None:
            try:
                t = hidden.shape[0]
                return c.logits(_pad(hidden, bucket), self.norm, self.lm_head, self.cfg.rms_norm_eps)[:t]
            except Exception as exc:
                c.fail(exc)
        return final_logits(hidden, self.norm, self.lm_head, self.cfg.rms_norm_eps)

    def use_eager_layout(self) -> None:
        """Store dense float32 matrices ``[in, out]`` (``quant.Transposed``): the faster layout for the eager BLAS,
        for an engine that decodes without compiling (switched off, or compilation failed)."""
        owners = [(layer, name) for layer in self.layers for name in LAYER_MATRICES]
        for owner, name in [*owners, (self, "lm_head")]:
            w = getattr(owner, name)
            if isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.device.type == "cpu":
                set_matrix(owner, name, Transposed(w.t().contiguous()))

    def enable_compile(self, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> float:
        """Compile the decode step for every bucket now, so no request pays for it; returns the seconds it took.

        Falls back to eager, with a warning, where compilation fails."""
        self.compiled = CompiledDecode(attn_in, attn_out, final_logits, buckets)
        h = self.cfg.hidden_size
        dev = self.norm.device

        @torch.inference_mode()
        def run(rows: int) -> None:
            c = self.compiled
            assert c is not None
            x = torch.zeros(rows, h, dtype=self.dtype, device=dev)
            cos, sin = self.cos[:rows], self.sin[:rows]
            w = self.layers[0].weights()
            c.attn_in(x, cos, sin, w, self.spec)
            attn = torch.zeros(rows, self.spec.num_heads * self.spec.head_dim, dtype=self.dtype, device=dev)
            c.attn_out(x, attn, w, self.spec)
            c.logits(x, self.norm, self.lm_head, self.cfg.rms_norm_eps)
            if rows == c.buckets[-1]:  # and the products outside this graph (decodes of 2-16 rows), per shape
                for m in (w.qkv, w.o, w.gate_up, w.down, self.lm_head):
                    if isinstance(m, QWeight):
                        kernels.dequantize(m, self.dtype)
                    for n in (2, 3):  # one graph, dynamic in the row count, once 2 and 3 rows have been seen
                        kernels.product(torch.zeros(n, m.shape[1] if isinstance(m, torch.Tensor) else m.in_features,
                                                    dtype=self.dtype, device=dev), m)  # fmt: skip

        return self.compiled.warm_up(run)


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows``."""
    extra = rows - x.shape[0]
    return x if extra == 0 else torch.cat((x, x.new_zeros(extra, *x.shape[1:])))
