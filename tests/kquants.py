"""A simple numpy quantizer for llama.cpp's k-quants (Q4_K, Q5_K, Q6_K), for writing small quantized GGUF test models.

gguf-py can dequantize the k-quants but not quantize them. This module fills that gap with a plain, vectorised
quantizer whose bytes follow the block layouts in llama.cpp's ``ggml-quants.c`` (and therefore agree with
``gguf.quants.dequantize``). It does not try to match llama.cpp's error-minimising search; it aims to be obviously
correct, with every value within half a quantization step of its input:

* Q4_K / Q5_K: each 32-value sub-block is mapped affinely onto 0..15 (0..31) from ``min(min, 0)`` to ``max``. The
  sub-block scales and offsets are quantized to 6 bits against the super-block's fp16 ``d`` and ``dmin`` by rounding
  UP, so the quantized grid always covers the sub-block and no value is clipped.
* Q6_K: each 16-value group is mapped symmetrically onto -31..31 (of the format's -32..31) by its absolute maximum;
  the group scales are quantized to int8 against the super-block's fp16 ``d``, again rounding up.

Every other type is delegated to ``gguf.quants.quantize``.
"""

from __future__ import annotations

import gguf
import numpy as np

QK_K = 256  # values per k-quant super-block
K_SCALE_SIZE = 12  # bytes of packed 6-bit scales and mins in Q4_K / Q5_K
_K_TYPES = (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K, gguf.GGMLQuantizationType.Q6_K)


def quantize(x: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Quantize ``x`` to ``qtype``, returning raw block bytes shaped like ``gguf.quants.quantize``'s output.

    The last dimension becomes bytes (``gguf.quants.quant_shape_to_byte_shape``); leading dimensions are kept.
    Q4_K, Q5_K and Q6_K are quantized here; every other type is delegated to ``gguf.quants.quantize``.

    Raises:
        ValueError: for a k-quant when the last dimension is not a multiple of 256, the input holds a non-finite
            value, or the values are too large for the format's fp16 super-block scales.
    """
    if qtype not in _K_TYPES:
        return gguf.quants.quantize(x, qtype)
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[-1] % QK_K != 0:
        raise ValueError(f"{qtype.name} needs a last dimension that is a multiple of {QK_K}, got shape {x.shape}")
    blocks = x.astype(np.float64).reshape(-1, QK_K)
    if not np.all(np.isfinite(blocks)):
        raise ValueError(f"cannot quantize non-finite values to {qtype.name}")
    if qtype == gguf.GGMLQuantizationType.Q6_K:
        out = _quantize_q6_k(blocks)
    else:
        out = _quantize_q45_k(blocks, five_bit=qtype == gguf.GGMLQuantizationType.Q5_K)
    assert out.shape[-1] == gguf.GGML_QUANT_SIZES[qtype][1]
    return out.reshape(gguf.quants.quant_shape_to_byte_shape(x.shape, qtype))


def _fp16_at_least(v: np.ndarray) -> np.ndarray:
    """Round non-negative ``v`` to fp16, stepping up one ulp where rounding went down, so the result is >= ``v``."""
    h = v.astype(np.float16)
    low = h.astype(np.float64) < v
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    if not np.all(np.isfinite(h)):
        raise ValueError("values too large for a k-quant's fp16 super-block scale")
    return h


def _ceil_ratio(num: np.ndarray, den: np.ndarray, top: int) -> np.ndarray:
    """``ceil(num / den)`` clipped to ``0..top`` as int64, and 0 where ``den`` is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(den > 0, np.ceil(num / np.where(den > 0, den, 1.0)), 0.0)
    return np.clip(r, 0, top).astype(np.int64)


def _pack_scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and 8 six-bit mins per block into the 12 bytes llama.cpp's ``get_scale_min_k4`` reads.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for the mins;
    bytes 8-11 hold the low nibbles of scale 4+j (bits 0-3) and min 4+j (bits 4-7).
    """
    out = np.empty((sc.shape[0], K_SCALE_SIZE), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _quantize_q45_k(blocks: np.ndarray, five_bit: bool) -> np.ndarray:
    """Quantize ``(n, 256)`` float64 blocks to Q4_K (144 bytes each) or Q5_K (176 bytes each).

    A value dequantizes as ``d * sc[j] * q - dmin * m[j]`` for its 32-value sub-block ``j``, with ``q`` in 0..15
    (Q4_K) or 0..31 (Q5_K) and ``sc``, ``m`` in 0..63.
    """
    n = blocks.shape[0]
    nmax = 31 if five_bit else 15
    sub = blocks.reshape(n, 8, 32)
    neg_min = -np.minimum(sub.min(axis=2), 0.0)  # (n, 8), >= 0: the offset that lifts the sub-block to >= 0
    top = sub.max(axis=2)

    dmin = _fp16_at_least(neg_min.max(axis=1) / 63)  # (n,) so that every neg_min <= 63 * dmin
    m = _ceil_ratio(neg_min, dmin.astype(np.float64)[:, None], 63)
    offset = dmin.astype(np.float32)[:, None] * m.astype(np.float32)  # as the dequantizer computes it
    offset = offset.astype(np.float64)

    step_needed = np.maximum(top + offset, 0.0) / nmax  # smallest step whose grid reaches the sub-block's max
    d = _fp16_at_least(step_needed.max(axis=1) / 63)
    sc = _ceil_ratio(step_needed, d.astype(np.float64)[:, None], 63)
    step = (d.astype(np.float32)[:, None] * sc.astype(np.float32)).astype(np.float64)

    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((sub + offset[:, :, None]) / np.where(step > 0, step, 1.0)[:, :, None])
    q = np.where(step[:, :, None] > 0, np.clip(q, 0, nmax), 0).astype(np.uint8)  # (n, 8, 32)

    # 4-bit plane: each 64-value chunk is 32 bytes, low nibbles = its first 32 values, high nibbles = the next 32.
    pairs = q.reshape(n, 4, 2, 32)
    qs = ((pairs[:, :, 0, :] & 0x0F) | ((pairs[:, :, 1, :] & 0x0F) << 4)).reshape(n, 128)

    parts = [
        d.reshape(n, 1).view(np.uint8),
        dmin.reshape(n, 1).view(np.uint8),
        _pack_scales_k4(sc.astype(np.uint8), m.astype(np.uint8)),
    ]
    if five_bit:
        # high-bit plane: bit j of byte l is bit 4 of value l of sub-block j.
        shifts = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        qh = np.bitwise_or.reduce(((q >> 4) & 1) << shifts, axis=1).astype(np.uint8)  # (n, 32)
        parts.append(qh)
    parts.append(qs)
    return np.concatenate(parts, axis=1)


def _quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Quantize ``(n, 256)`` float64 blocks to Q6_K (210 bytes each: ql[128], qh[64], int8 scales[16], fp16 d).

    A value dequantizes as ``d * scales[g] * (q - 32)`` for its 16-value group ``g``, with ``q`` in 0..63; this
    quantizer uses ``q - 32`` in -31..31 so the grid is symmetric and no value is clipped.
    """
    n = blocks.shape[0]
    grp = blocks.reshape(n, 16, 16)
    step_needed = np.abs(grp).max(axis=2) / 31  # (n, 16)
    d = _fp16_at_least(step_needed.max(axis=1) / 127)
    sc = _ceil_ratio(step_needed, d.astype(np.float64)[:, None], 127)
    step = (d.astype(np.float32)[:, None] * sc.astype(np.float32)).astype(np.float64)

    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(grp / np.where(step > 0, step, 1.0)[:, :, None])
    q = np.where(step[:, :, None] > 0, np.clip(q, -31, 31), 0)
    v = (q + 32).astype(np.uint8).reshape(n, 2, 128)  # two 128-value halves

    # ql: per half, 64 bytes; low nibbles = values 0..63 of the half, high nibbles = values 64..127.
    ql = ((v[:, :, :64] & 0x0F) | ((v[:, :, 64:] & 0x0F) << 4)).reshape(n, 128)
    # qh: per half, 32 bytes; bits 2s..2s+1 of byte l = bits 4..5 of value 32*s + l of the half.
    hi = (v.reshape(n, 2, 4, 32) >> 4) & 0x03
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    qh = np.bitwise_or.reduce(hi << shifts, axis=2).astype(np.uint8).reshape(n, 64)

    scales = sc.astype(np.int8).view(np.uint8)
    return np.concatenate([ql, qh, scales, d.reshape(n, 1).view(np.uint8)], axis=1)
