"""Round-trip tests for the k-quant test helper (tests/kquants.py) against gguf-py's reference dequantizers.

Error bounds (derived from how the helper quantizes; both already include the rounding of the sub-block scales to
6 bits / int8 against the super-block's fp16 scale, and fp16 rounding adds at most ~0.1%):

* Q4_K / Q5_K, ``n = 15 / 31`` levels, per 32-value sub-block with ``range = max - min(min, 0)``; over the 256-value
  super-block ``R`` = the largest range and ``M`` = the largest ``-min(min, 0)``. ``dmin <= 1.001 M/63``; the offset is
  rounded up by at most ``dmin``, the step needed is ``t <= (range + dmin)/n``, ``d <= 1.001 max(t)/63``, the
  6-bit scale rounds the step up by at most ``d``, and no value is clipped, so
  ``|err| <= step/2 <= 0.5 * (range + dmin + (R + dmin)/63 * 1.001) / n``.
* Q6_K, per 16-value group with ``amax = max |x|`` (``A`` = the super-block's largest): step ``<= amax/31 + d`` with
  ``d <= 1.001 A/(31 * 127)``, so ``|err| <= 0.5 * (amax + 1.01 A/127) / 31``.

Both get ``1e-6 * (1 + max |x|)`` of float32 slack.

On top of the max bound, the mean |error| must stay near what uniform rounding gives (about half the bound, asserted
<= 0.6x) and the signed mean error must be ~0, so a mispacked nibble, high bit or scale cannot slip through.
"""

from __future__ import annotations

import time

import gguf
import numpy as np
import pytest
from kquants import quantize

Q = gguf.GGMLQuantizationType
K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
ATOL = 1e-6  # float32 arithmetic / fp16 subnormal slack, relative to 1 + max |x| of the super-block


def _bound(x: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Per-value max |error| allowed for ``x`` quantized to ``qtype`` (shaped like ``x``); see the module docstring."""
    blocks = x.astype(np.float64).reshape(-1, 256)
    n = blocks.shape[0]
    slack = ATOL * (1.0 + np.abs(blocks).max(axis=1, keepdims=True))  # (n, 1)
    if qtype == Q.Q6_K:
        grp = blocks.reshape(n, 16, 16)
        amax = np.abs(grp).max(axis=2)
        big = amax.max(axis=1, keepdims=True)
        per_group = 0.5 * (amax + 1.01 * big / 127) / 31 + slack
        return np.broadcast_to(per_group[:, :, None], grp.shape).reshape(x.shape)
    levels = 15 if qtype == Q.Q4_K else 31
    sub = blocks.reshape(n, 8, 32)
    neg_min = -np.minimum(sub.min(axis=2), 0.0)
    rng = sub.max(axis=2) + neg_min
    dmin = 1.001 * neg_min.max(axis=1, keepdims=True) / 63
    big = rng.max(axis=1, keepdims=True)
    per_sub = 0.5 * (rng + dmin + 1.001 * (big + dmin) / 63) / levels + slack
    return np.broadcast_to(per_sub[:, :, None], sub.shape).reshape(x.shape)


def _round_trip(x: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray]:
    """Quantize with the helper, check the byte layout's size and shape, and dequantize with gguf-py."""
    raw = quantize(x, qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert raw.dtype == np.uint8
    assert raw.shape == gguf.quants.quant_shape_to_byte_shape(x.shape, qtype)
    assert raw.nbytes == type_size * (x.size // block_size)
    y = gguf.quants.dequantize(raw, qtype)
    assert y.shape == x.shape
    return raw, y


def _check_errors(x: np.ndarray, y: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
    """Assert the max bound everywhere, and that mean |error| and bias are well inside it."""
    bound = _bound(x, qtype)
    err = y.astype(np.float64) - x.astype(np.float64)
    worst = np.unravel_index(np.argmax(np.abs(err) - bound), x.shape)
    assert np.all(np.abs(err) <= bound), f"{qtype.name}: err {err[worst]} > bound {bound[worst]} at {worst}"
    assert np.abs(err).mean() <= 0.6 * bound.mean()
    assert abs(err.mean()) <= 0.05 * bound.mean()


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(3, 256), (64, 512), (2, 3, 1024)], ids=str)
def test_random_normal_round_trip(qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> None:
    """Random normal tensors of several shapes come back within the bit width's error bound."""
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    _, y = _round_trip(x, qtype)
    _check_errors(x, y, qtype)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_shifted_and_mixed_scale_round_trip(qtype: gguf.GGMLQuantizationType) -> None:
    """Positive-offset rows and sub-blocks whose magnitudes differ by 10^4 (small 6-bit / int8 scales)."""
    rng = np.random.default_rng(7)
    shifted = rng.standard_normal((8, 512)) + 5.0
    factors = 10.0 ** rng.uniform(-3, 1, size=(8, 512 // 16, 1))
    mixed = (rng.standard_normal((8, 512 // 16, 16)) * factors).reshape(8, 512)
    x = np.concatenate([shifted, -shifted, mixed]).astype(np.float32)
    _, y = _round_trip(x, qtype)
    _check_errors(x, y, qtype)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_constant_rows(qtype: gguf.GGMLQuantizationType) -> None:
    """Constant rows (either sign, tiny to large) come back within the bound, and within fp16 precision."""
    consts = np.array([1.5, -2.25, 0.0, 1e-3, -1e-3, 0.1, -0.1, 100.0, -100.0, 3.0e3], dtype=np.float32)
    x = np.repeat(consts[:, None], 512, axis=1)
    _, y = _round_trip(x, qtype)
    assert np.all(np.abs(y - x) <= _bound(x, qtype))
    normal = np.abs(consts) >= 1.0  # fp16 super-block scales are normal numbers here, not subnormal
    assert np.all(np.abs(y - x)[normal] <= 2e-3 * np.abs(x[normal]))
    assert np.all(y[consts == 0] == 0)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_zero_rows(qtype: gguf.GGMLQuantizationType) -> None:
    """All-zero rows dequantize to exact zeros, also when other rows of the matrix are not zero."""
    x = np.random.default_rng(3).standard_normal((6, 512)).astype(np.float32)
    x[[0, 3, 5]] = 0.0
    _, y = _round_trip(x, qtype)
    assert np.all(y[[0, 3, 5]] == 0)
    _check_errors(x[[1, 2, 4]], y[[1, 2, 4]], qtype)
    _, y0 = _round_trip(np.zeros((2, 256), dtype=np.float32), qtype)
    assert np.all(y0 == 0)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_rejects_bad_row_length(qtype: gguf.GGMLQuantizationType) -> None:
    """A last dimension that is not a multiple of 256 (or a non-finite value) raises ValueError."""
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((3, 128), dtype=np.float32), qtype)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((300,), dtype=np.float32), qtype)
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.full((1, 256), np.nan, dtype=np.float32), qtype)


def test_large_matrix_is_fast() -> None:
    """A 576x1536 matrix quantizes in well under a second for each k-quant type."""
    x = np.random.default_rng(11).standard_normal((576, 1536)).astype(np.float32)
    for qtype in K_TYPES:
        start = time.perf_counter()
        quantize(x, qtype)
        assert time.perf_counter() - start < 1.0, qtype.name


def test_other_types_delegate_to_gguf() -> None:
    """Non-k-quant types go to gguf.quants.quantize: identical bytes, and Q8_0 round-trips within half a step."""
    x = np.random.default_rng(5).standard_normal((4, 256)).astype(np.float32)
    raw, y = _round_trip(x, Q.Q8_0)
    assert np.array_equal(raw, gguf.quants.quantize(x, Q.Q8_0))
    amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    err = np.abs(y - x).reshape(-1, 32)
    # gguf's Q8_0 rounds against the float32 scale but stores it as fp16: up to 127 * 2^-11 of a step more.
    assert np.all(err <= (0.5 + 127 * 2.0**-11) * amax / 127 + ATOL)
    assert np.array_equal(quantize(x, Q.F16), gguf.quants.quantize(x, Q.F16))
