"""Llama-family decoder (Llama 1/2/3, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache, in plain torch.

Weights are fused at load time (q|k|v into one matrix, gate|up into another) so a layer is four matmuls, and
stored transposed, ``[in, out]``: ``x @ W`` with that layout is markedly faster than ``F.linear`` for the
one-row products of decode on CPU BLAS (the LM head ~2.5x with its weights out of cache), and no slower for
prefill. The forward uses functional ops to keep per-token Python overhead low.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from promptcache.model.attention import paged_attention
from promptcache.model.config import ModelConfig
from promptcache.model.context import ForwardContext


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as the reference implementation does."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def _linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight_t [in, out] (+ bias)."""
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; x [T, heads, D], cos/sin [T, 1, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.eps = cfg.rms_norm_eps

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.input_norm = param(h)
        # Matrices are [in, out] (transposed from the checkpoint's [out, in]).
        self.qkv = param(h, self.q_size + 2 * self.kv_size)
        self.qkv_bias = param(self.q_size + 2 * self.kv_size) if cfg.attention_bias else None
        self.q_norm = param(d) if cfg.qk_norm else None
        self.k_norm = param(d) if cfg.qk_norm else None
        self.o = param(self.q_size, h)
        self.post_norm = param(h)
        # gate and up as one [2, in, out] batch: one matmul call whose two halves come out contiguous, which
        # keeps SiLU-and-multiply on dense memory (chunking a fused [T, 2I] product leaves strided halves).
        self.gate_up = param(2, h, cfg.intermediate_size)
        self.down = param(cfg.intermediate_size, h)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = _linear(_rms_norm(x, self.input_norm, self.eps), self.qkv, self.qkv_bias)
        nq, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        v = qkv[:, self.q_size + self.kv_size :].view(t, nkv, d)
        if self.q_norm is None:
            # q and k share one RoPE call: their heads sit side by side in the fused projection.
            qk = _rope(qkv[:, : self.q_size + self.kv_size].view(t, nq + nkv, d), cos, sin)
            q, k = qk[:, :nq], qk[:, nq:]
        else:
            q = _rope(_rms_norm(qkv[:, : self.q_size].view(t, nq, d), self.q_norm, self.eps), cos, sin)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(t, nkv, d)
            k = _rope(_rms_norm(k, self.k_norm, self.eps), cos, sin)
        attn = paged_attention(q, k, v, k_cache, v_cache, ctx)
        x = x + _linear(attn, self.o)
        gate, up = torch.matmul(_rms_norm(x, self.post_norm, self.eps), self.gate_up)
        return x + _linear(F.silu(gate, inplace=True).mul_(up), self.down)


class LlamaForCausalLM(nn.Module):
    """The decoder stack plus embeddings and LM head; ``forward`` returns hidden states of the new tokens."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_len: int):
        super().__init__()
        self.cfg = cfg
        # The LM head, [hidden, vocab], for the fast one-row product above on every decode step.
        self.lm_head = nn.Parameter(
            torch.empty(cfg.hidden_size, cfg.vocab_size, dtype=dtype, device=device), requires_grad=False
        )
        self.embed: torch.Tensor
        if cfg.tie_word_embeddings:
            # NOTE: tied embeddings are one matrix: the embedding is a transposed view of the LM head (a lookup
            # gathers one strided row per token, cheap), which saves a vocab x hidden copy (113 MB for SmolLM2).
            self.embed = self.lm_head.t()
        else:
            self.embed = nn.Parameter(
                torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False
            )
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
        # RoPE tables for every position we can serve, computed in float32 then cast, as the reference does.
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * cfg.inv_freq()[None, :]
        self.register_buffer("cos", freqs.cos().to(dtype).to(device)[:, None, :], persistent=False)
        self.register_buffer("sin", freqs.sin().to(dtype).to(device)[:, None, :], persistent=False)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext, kv_cache: torch.Tensor) -> torch.Tensor:
        """input_ids [T]; kv_cache [layers, 2, slots, kv_heads, head_dim]. Returns hidden states [T, hidden]."""
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.cos[ctx.positions], self.sin[ctx.positions]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_cache[i, 0], kv_cache[i, 1], ctx)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in float32 for selected rows of hidden states (the final norm is row-wise, so applied here)."""
        return _linear(_rms_norm(hidden, self.norm, self.cfg.rms_norm_eps), self.lm_head).float()
