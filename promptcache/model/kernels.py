"""``torch.compile`` for decode: which graphs exist, their batch buckets, the switch, and the fallback.

Decode is memory-bound: each step streams every weight once for a handful of rows. Eager PyTorch spends a one-row
step in BLAS calls tuned for big products and in ~15 small ops per layer. Two kinds of graphs fix that:

- the fused step (``CompiledDecode``), for one-row batches by default: each half of a layer (norm, projection,
  RoPE; output projection, residual, norm, MLP) becomes a few loops, every projection a ``quant.gemv`` that
  streams the weights (a quantized matrix as its integer codes) once. Its graphs take the weights as arguments,
  so all layers share them; batches are padded up to the next bucket.
- the product alone (``product``), for 2-16 rows in the eager layer: one graph per weight shape, dynamic in the
  row count, for quantized and float32 matrices (bfloat16 ones are fast in the BLAS already).

Prefill is compute-bound and keeps the BLAS (a quantized matrix is dequantized by a compiled kernel first). Fused
graphs for 2-16 rows were measured slower here than the eager layer with compiled products (docs/kernels.md), so
the default buckets are ``(1,)``. Compiling costs seconds (inductor's on-disk cache makes a restart cheaper);
``CompiledDecode.warm_up`` pays it at start-up and reports it. Where compilation fails (no C++ compiler, an
unsupported op), the engine logs why and runs eager.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from promptcache.model import quant

log = logging.getLogger(__name__)

# Batch sizes the fused decode step is compiled for. Only 1 by default: measured here, inductor's fused graphs at
# 2-16 rows were slower than the eager layer with a compiled product (docs/kernels.md); larger buckets are allowed.
DEFAULT_BUCKETS = (1,)


def compiling() -> bool:
    """True while dynamo traces a graph (the code then emits the fused, compile-only form of an op)."""
    return torch.compiler.is_compiling()


# Rows up to which the compiled ``quant.gemv`` beats the BLAS outside the fused step (docs/kernels.md): quantized
# weights (dequantizing a whole matrix costs more) and float32 ones (MKL's 2-4 row products are slow here);
# bfloat16 weights always take the BLAS, which is fast for them.
GEMV_MAX_ROWS = 16
FP32_GEMV_MAX_ROWS = 4

_dequantize_compiled: Callable[..., torch.Tensor] | None = None
_gemv_compiled: Callable[..., torch.Tensor] | None = None


def product(x: torch.Tensor, w: torch.Tensor | quant.QWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T`` (+ bias) outside the fused step: the compiled ``quant.gemv`` (one graph, dynamic in the row
    count) for few rows, else the BLAS (a quantized matrix dequantized first)."""
    fn = _gemv_compiled
    limit = GEMV_MAX_ROWS if isinstance(w, quant.QWeight) else FP32_GEMV_MAX_ROWS if w.dtype == torch.float32 else 0
    if fn is not None and x.shape[0] <= limit and x.device.type == "cpu":
        try:
            y = fn(x, w)
            return y if bias is None else y + bias
        except Exception as exc:  # compile-time failure: note it once and stay eager from now on
            _disable(exc)
    return torch.nn.functional.linear(x, dequantize(w, x.dtype) if isinstance(w, quant.QWeight) else w, bias)


def dequantize(w: quant.QWeight, dtype: torch.dtype) -> torch.Tensor:
    """``quant.dequantize``, fused into one pass by inductor when compilation is on (eagerly it takes several)."""
    fn = _dequantize_compiled
    if fn is not None and w.q.device.type == "cpu":
        try:
            return fn(w, dtype)
        except Exception as exc:
            _disable(exc)
    return quant.dequantize(w, dtype)


def enable_quantized_kernels() -> None:
    """Compile ``quant.gemv`` and ``quant.dequantize`` (lazily, per weight shape, at their first call)."""
    global _dequantize_compiled, _gemv_compiled
    if _dequantize_compiled is None:
        _raise_recompile_limit()
        _dequantize_compiled = torch.compile(quant.dequantize, dynamic=False)
        _gemv_compiled = torch.compile(quant.gemv, dynamic=True)


def _disable(exc: Exception) -> None:
    global _dequantize_compiled, _gemv_compiled
    _dequantize_compiled = _gemv_compiled = None
    log.warning("compiled quantized kernels failed, running eager: %s", exc)


def _raise_recompile_limit() -> None:
    # NOTE: one graph per (bucket, weight shape, kind); a 4-bucket model reaches the default limit of 8 quickly.
    config: Any = torch._dynamo.config
    config.recompile_limit = max(getattr(config, "recompile_limit", 8), 256)
    config.accumulated_recompile_limit = max(getattr(config, "accumulated_recompile_limit", 256), 4096)


class CompiledDecode:
    """The compiled halves of a decoder layer (and the LM head) for decode batches up to the largest bucket."""

    def __init__(
        self,
        attn_in: Callable[..., Any],
        attn_out: Callable[..., Any],
        logits: Callable[..., Any],
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
    ):
        _raise_recompile_limit()
        self.buckets = tuple(sorted(buckets))
        self.attn_in = torch.compile(attn_in, dynamic=False)
        self.attn_out = torch.compile(attn_out, dynamic=False)
        self.logits = torch.compile(logits, dynamic=False)
        self.failed: str | None = None
        self.compile_seconds: dict[int, float] = {}

    def bucket(self, rows: int) -> int | None:
        """The smallest bucket holding ``rows`` decodes, or None when the batch is larger than every bucket."""
        if self.failed is not None:
            return None
        return next((b for b in self.buckets if b >= rows), None)

    def fail(self, exc: BaseException) -> None:
        """Give up compiling for good (the step that hit this reruns eagerly)."""
        self.failed = f"{type(exc).__name__}: {exc}"
        log.warning("torch.compile of the decode step failed; decoding eagerly from now on (%s)", self.failed)

    def warm_up(self, run: Callable[[int], None]) -> float:
        """Compile every bucket by calling ``run(bucket)``; returns the seconds spent (also kept per bucket)."""
        start = time.perf_counter()
        for b in self.buckets:
            t = time.perf_counter()
            try:
                run(b)
            except Exception as exc:
                self.fail(exc)
                break
            self.compile_seconds[b] = time.perf_counter() - t
        total = time.perf_counter() - start
        if self.failed is None:
            log.info("compiled the decode step for batch buckets %s in %.1f s", list(self.buckets), total)
        return total
