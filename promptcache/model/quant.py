"""Weight-only quantized matrices (int8, int4) and the one ``linear`` every projection goes through.

A quantized matrix is a ``QWeight``: integer codes plus a float32 scale (and, for int4, a float32 offset) per group
of ``GROUP`` consecutive input features of each output row. The layout is chosen so that llama.cpp's common types
map onto it exactly, with no requantization:

- int8: ``w[o, i] = q[o, i] * scale[o, i // 32]``. GGUF Q8_0 is exactly this (its fp16 scale widens exactly).
- int4: ``w[o, g*32 + j] = nib * scale[o, g] + zero[o, g]`` where byte ``j`` (0..15) of group ``g`` holds element
  ``j`` in its low nibble and element ``16 + j`` in its high nibble: the Q4_0 / Q4_1 block layout. Q4_0 is
  ``zero = -8 * scale``, Q4_1 ``zero = m``, and Q4_K's sub-blocks are ``scale = d * sc``, ``zero = -dmin * m``.

Matrices, dense or quantized, are stored ``[out, in]``. ``linear`` picks the kernel: inside the compiled decode
step, a matrix-vector product written for inductor (``gemv``), which streams the weights (a quantized one as its
codes) once for the whole batch; elsewhere (prefill, eager decode) the BLAS, a quantized matrix dequantized first.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

GROUP = 32  # input features per scale (llama.cpp's block size for Q8_0 / Q4_0 / Q4_1, and Q4_K's sub-blocks)
QUANTIZATIONS = ("auto", "none", "int8", "int4")
# Rows up to which the compiled product beats the BLAS on dense weights (docs/kernels.md); quantized weights use it
# for every compiled bucket (dequantizing a whole matrix per step costs more than the product).
DENSE_GEMV_MAX_ROWS = 1


class Transposed(NamedTuple):
    """A dense float32 matrix kept ``[in, out]`` for the eager BLAS: where nothing is compiled, ``x @ W`` with this
    layout is about 1.7x faster than ``F.linear`` on ``[out, in]`` for the one-row products of decode on CPU (MKL's
    matrix-vector paths are slow here), and no slower for prefill (docs/kernels.md)."""

    t: torch.Tensor  # [in, out], contiguous


def stored_kind(quantization: str, head: bool) -> str | None:
    """The kind a matrix is quantized to when ``quantization`` asks for int8 or int4 (None otherwise).

    NOTE: under int4 the LM head (and a tied embedding) stays int8, as llama.cpp's recipes and most int4 schemes
    keep the output layer at higher precision: on SmolLM2 an int4 head alone costs 4-6% perplexity
    (docs/kernels.md), an int8 one 0.3%."""
    if quantization not in ("int8", "int4"):
        return None
    return "int8" if head else quantization


class QWeight(NamedTuple):
    """A quantized ``[out, in]`` matrix. A NamedTuple of tensors, so ``torch.compile`` sees plain tensor inputs."""

    q: torch.Tensor  # int8 [out, in]; or uint8 [out, in / 32, 16] for int4 (two codes per byte)
    scale: torch.Tensor  # float32 [out, in / 32]
    zero: torch.Tensor | None  # int4: float32 [out, in / 32]; int8: None (symmetric)

    @property
    def kind(self) -> str:
        return "int8" if self.q.dtype == torch.int8 else "int4"

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.scale.shape[1] * GROUP

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self if t is not None)

    def to(self, device: torch.device) -> QWeight:
        return QWeight(*(None if t is None else t.to(device) for t in self))


def can_quantize(w: torch.Tensor) -> bool:
    """Whether a ``[out, in]`` matrix fits the group layout (its input features are whole groups)."""
    return w.dim() == 2 and w.shape[1] % GROUP == 0


def quantize(w: torch.Tensor, kind: str) -> QWeight:
    """Quantize a dense ``[out, in]`` matrix: int8 symmetric by each group's absolute maximum, int4 affine from
    each group's minimum to its maximum (16 levels), both rounding to nearest."""
    if kind not in ("int8", "int4"):
        raise ValueError(f"quantization kind must be int8 or int4, got {kind!r}")
    if not can_quantize(w):
        raise ValueError(f"cannot quantize a matrix of shape {tuple(w.shape)}: inputs must be a multiple of {GROUP}")
    out, inp = w.shape
    g = w.float().reshape(out, inp // GROUP, GROUP)
    if kind == "int8":
        scale = g.abs().amax(-1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(g / scale[..., None]).clamp_(-127, 127).to(torch.int8).reshape(out, inp)
        return QWeight(q.contiguous(), scale.contiguous(), None)
    codes, scale, zero = _fit_int4(g)
    return QWeight(pack_int4(codes), scale.contiguous(), zero.contiguous())


def _fit_int4(g: torch.Tensor, shrinks: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8), refits: int = 2):
    """Per group of ``g [out, groups, 32]``: the 16-level affine grid (codes, scale, zero) of least squared error.

    Min-to-max rounding wastes levels on outliers; like llama.cpp's k-quant search, this tries a few narrowed
    ranges (outliers then clip to the end levels), refits scale and zero to the codes by least squares, and keeps,
    per group, whichever candidate has the smallest error. The first candidate is the plain min-max grid, so the
    result is never worse than it."""
    lo, hi = g.amin(-1), g.amax(-1)
    best_err = torch.full(lo.shape, float("inf"))
    best = (torch.zeros(g.shape, dtype=torch.uint8), torch.ones_like(lo), lo.clone())
    for shrink in shrinks:
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * shrink
        zero, scale = mid - half, 2 * half / 15
        for fit in range(refits + 1):
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            codes = torch.round((g - zero[..., None]) / scale[..., None]).clamp_(0, 15)
            err = ((codes * scale[..., None] + zero[..., None] - g) ** 2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = (
                torch.where(better[..., None], codes.to(torch.uint8), best[0]),
                torch.where(better, scale, best[1]),
                torch.where(better, zero, best[2]),
            )
            if fit < refits:  # least-squares scale and zero for these codes
                n, sc, scc = g.shape[-1], codes.sum(-1), (codes * codes).sum(-1)
                sw, scw = g.sum(-1), (codes * g).sum(-1)
                det = n * scc - sc * sc
                ok = det > 0
                scale = torch.where(ok, (n * scw - sc * sw) / torch.where(ok, det, 1.0), scale)
                zero = torch.where(ok, (sw - scale * sc) / n, zero)
    return best


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 shaped ``[out, groups, 32]`` -> bytes ``[out, groups, 16]`` (element j low, 16 + j high)."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: ``[out, groups, 16]`` bytes -> ``[out, groups, 32]`` codes (uint8)."""
    return torch.cat((packed & 15, packed >> 4), dim=-1)


def dequantize(w: QWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense ``[out, in]`` matrix, computed in float32 (exactly as llama.cpp's dequantization) then cast."""
    if w.zero is None:
        g = w.q.view(w.out_features, -1, GROUP).float() * w.scale[..., None]
    else:
        g = unpack_int4(w.q).float() * w.scale[..., None] + w.zero[..., None]
    return g.reshape(w.out_features, w.in_features).to(dtype)


def take_rows(w: QWeight, rows: torch.Tensor) -> QWeight:
    """The output rows ``rows`` of ``w`` (an embedding lookup in a tied, quantized LM head)."""
    return QWeight(w.q[rows], w.scale[rows], None if w.zero is None else w.zero[rows])


def gemv(x: torch.Tensor, w: torch.Tensor | QWeight) -> torch.Tensor:
    """``x [T, in]`` times ``w [out, in]`` transposed, for a few rows, reading ``w`` (a ``QWeight`` as its codes)
    once for all rows. Written for ``torch.compile``: inductor turns it into one loop over the weight rows whose
    inner reduction runs along contiguous memory, the T rows sharing each weight row while it is in cache (eagerly it
    would materialise a float copy of the matrix per row)."""
    xf = x.float()
    if not isinstance(w, QWeight):
        out = (w.float()[:, None, :] * xf[None]).sum(-1)
    elif w.zero is None:
        dense = (w.q.view(w.out_features, -1, GROUP).float() * w.scale[..., None]).view(w.out_features, -1)
        out = (dense[:, None, :] * xf[None]).sum(-1)
    else:
        groups = w.scale.shape[1]
        xg = xf.view(1, x.shape[0], groups, 2, 16)  # each group's first and second 16 inputs
        lo = ((w.q & 15).float() * w.scale[..., None] + w.zero[..., None])[:, None]
        hi = ((w.q >> 4).float() * w.scale[..., None] + w.zero[..., None])[:, None]
        out = (lo * xg[:, :, :, 0] + hi * xg[:, :, :, 1]).sum((-1, -2))
    return out.t().to(x.dtype)  # [out, T] -> [T, out]


def linear(x: torch.Tensor, w: torch.Tensor | QWeight | Transposed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [T, in]`` times an ``[out, in]`` matrix, dense or ``QWeight``, transposed (+ bias): ``[T, out]``."""
    from promptcache.model import kernels

    if isinstance(w, Transposed):
        return torch.mm(x, w.t) if bias is None else torch.addmm(bias, x, w.t)
    if kernels.compiling() and (isinstance(w, QWeight) or x.shape[0] <= DENSE_GEMV_MAX_ROWS):
        y = gemv(x, w)  # traced into the compiled decode step
        return y if bias is None else y + bias
    return kernels.product(x, w, bias)
