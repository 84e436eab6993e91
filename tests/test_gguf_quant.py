"""Specification of ``gguf_quant.to_qweight``: GGUF block bytes become a ``QWeight`` with the very same numbers.

For every type in ``QUANT_KINDS``, dequantizing the converted ``QWeight`` must give, bit for bit, what gguf-py's
reference dequantizer gives for the raw bytes; any other type is refused by name. Raw bytes come from two sources:
``kquants.quantize`` of random matrices (realistic blocks, values of very different magnitudes, all-zero rows) and
plain random bytes with finite fp16 scales (every nibble position and every bit of Q4_K's packed 6-bit scales).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from kquants import quantize

from promptcache.model import quant
from promptcache.model.gguf_quant import QUANT_KINDS, to_qweight

Q = gguf.GGMLQuantizationType
SUPPORTED = [Q[name] for name in QUANT_KINDS]
SHAPES = [(3, 256), (64, 512), (5, 768)]  # [out, in]; in is a whole number of Q4_K super-blocks
FP16_OFFSETS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q4_K: (0, 2)}  # byte offsets of each block's fp16s


def _matrix(out: int, inp: int, seed: int) -> np.ndarray:
    """Random float32 ``[out, in]``: each row scaled by 10^-4 .. 10^3, one row all zeros, one row all positive."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((out, inp)) * 10.0 ** rng.integers(-4, 4, size=(out, 1))
    x[0] = 0.0
    x[-1] = np.abs(x[-1]) + 1.0  # no negative value: Q4_1 / Q4_K offsets that are not at or below zero
    return x.astype(np.float32)


def _random_blocks(out: int, inp: int, qtype: gguf.GGMLQuantizationType, seed: int) -> np.ndarray:
    """Random block bytes ``[out, bytes_per_row]`` whose fp16 scales are any finite value (subnormals and -0 too)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(out, inp // block_size, type_size), dtype=np.uint8)
    for offset in FP16_OFFSETS[qtype]:
        bits = rng.integers(0, 1 << 16, size=raw.shape[:2], dtype=np.uint16)
        bits = np.where((bits & 0x7C00) == 0x7C00, bits & ~np.uint16(0x4000), bits)  # inf / NaN -> finite
        raw[..., offset : offset + 2] = bits.astype("<u2")[..., None].view(np.uint8)
    return raw.reshape(out, -1)


def _assert_bit_exact(raw: np.ndarray, qtype: gguf.GGMLQuantizationType) -> quant.QWeight:
    """The conversion's dequantization equals gguf-py's, bit for bit (no tolerance)."""
    qw = to_qweight(raw, qtype)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    got = quant.dequantize(qw)
    assert got.shape == expected.shape
    assert torch.equal(got, expected), f"{qtype.name}: max |diff| {(got - expected).abs().max().item()}"
    return qw


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_quantized_matrix_dequantizes_exactly_as_gguf(qtype: gguf.GGMLQuantizationType, shape: tuple[int, int]) -> None:
    _assert_bit_exact(quantize(_matrix(*shape, seed=shape[0]), qtype), qtype)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_any_block_bytes_with_finite_scales_dequantize_exactly_as_gguf(qtype: gguf.GGMLQuantizationType) -> None:
    for seed, (out, inp) in enumerate(SHAPES):
        _assert_bit_exact(_random_blocks(out, inp, qtype, seed), qtype)


def test_q4_k_scales_and_mins_unpack_from_their_6_bit_fields() -> None:
    """Sub-blocks 4-7 keep bits 4-5 of their scale / min in the top bits of bytes 0-3 / 4-7: all 6 bits count."""
    sc = np.array([1, 17, 33, 63, 2, 18, 47, 63], dtype=np.uint8)
    m = np.array([0, 16, 31, 62, 63, 5, 40, 21], dtype=np.uint8)
    packed = np.empty(12, dtype=np.uint8)
    packed[0:4] = sc[:4] | ((sc[4:] >> 4) << 6)
    packed[4:8] = m[:4] | ((m[4:] >> 4) << 6)
    packed[8:12] = (sc[4:] & 0x0F) | ((m[4:] & 0x0F) << 4)
    d, dmin = np.float16(0.5), np.float16(0.25)
    codes = np.arange(128, dtype=np.uint8)  # every code byte distinct, so a misplaced nibble shows
    raw = np.concatenate([np.array([d, dmin], dtype="<f2").view(np.uint8), packed, codes])[None, :]

    qw = _assert_bit_exact(raw, Q.Q4_K)
    assert qw.scale[0].tolist() == (0.5 * sc.astype(np.float64)).tolist()
    assert qw.zero[0].tolist() == (-0.25 * m.astype(np.float64)).tolist()
    # Sub-block 2k is the low nibbles of code bytes 32k .. 32k+31, sub-block 2k+1 their high nibbles.
    unpacked = quant.unpack_int4(qw.q)[0]  # [8 sub-blocks, 32 codes]
    chunks = codes.reshape(4, 32)
    expected = np.stack([chunks & 0x0F, chunks >> 4], axis=1).reshape(8, 32)
    assert torch.equal(unpacked, torch.from_numpy(expected))


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_qweight_layout_dtypes_and_size(qtype: gguf.GGMLQuantizationType) -> None:
    out, inp = 64, 512
    raw = quantize(_matrix(out, inp, seed=1), qtype)
    qw = to_qweight(raw, qtype)
    groups = inp // quant.GROUP
    assert qw.kind == QUANT_KINDS[qtype.name]
    assert (qw.out_features, qw.in_features) == (out, inp)
    assert qw.scale.dtype == torch.float32 and qw.scale.shape == (out, groups)
    assert all(t.is_contiguous() for t in qw if t is not None)
    fp32_bytes = out * inp * 4
    if qw.kind == "int8":
        assert qw.q.dtype == torch.int8 and qw.q.shape == (out, inp) and qw.zero is None
        assert qw.nbytes == out * inp + out * groups * 4  # 1 byte a value + a float32 scale per 32
        assert qw.nbytes * 3.5 <= fp32_bytes
    else:
        assert qw.q.dtype == torch.uint8 and qw.q.shape == (out, groups, 16)
        assert qw.zero is not None and qw.zero.dtype == torch.float32 and qw.zero.shape == (out, groups)
        assert qw.nbytes == out * inp // 2 + out * groups * 8  # half a byte a value + scale and zero per 32
        assert qw.nbytes * 5 <= fp32_bytes
    # Within 1.5x of the GGUF blocks themselves (which keep fp16 scales, or 6-bit ones for Q4_K).
    assert qw.nbytes <= 1.5 * raw.nbytes


def test_reader_tensors_convert_without_aliasing_the_file(tmp_path: Path) -> None:
    """``ReaderTensor.data`` is a read-only memmap ``[out, bytes_per_row]``; the QWeight must own its memory."""
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    matrices = {qtype: _matrix(8, 256, seed=int(qtype)) for qtype in SUPPORTED}
    for qtype, x in matrices.items():
        raw = quantize(x, qtype)
        writer.add_tensor(qtype.name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(path))
    assert len(reader.tensors) == len(SUPPORTED)
    for t in reader.tensors:
        assert [int(n) for n in t.shape] == [256, 8]  # GGUF order: [in, out]
        assert t.data.shape[0] == 8 and not t.data.flags.writeable
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. torch's warning about wrapping a non-writable array
            qw = _assert_bit_exact(t.data, t.tensor_type)
        for tensor in (x for x in qw if x is not None):
            assert not np.shares_memory(tensor.numpy(), t.data)
            tensor.add_(0)  # writable: not a view of the read-only mapping


@pytest.mark.parametrize("qtype", [Q.Q6_K, Q.Q5_K, Q.Q5_0, Q.Q8_1, Q.F16, Q.F32, Q.BF16], ids=lambda t: t.name)
def test_other_types_are_refused_by_name(qtype: gguf.GGMLQuantizationType) -> None:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.zeros((2, 512 // block_size * type_size), dtype=np.uint8)
    with pytest.raises(ValueError, match=qtype.name):
        to_qweight(raw, qtype)


def test_bytes_that_are_not_a_matrix_of_whole_blocks_are_refused() -> None:
    raw = quantize(_matrix(4, 256, seed=2), Q.Q4_0)
    with pytest.raises(ValueError, match="2-D"):
        to_qweight(raw[None], Q.Q4_0)  # stacked (e.g. MoE experts): convert one matrix at a time
    with pytest.raises(ValueError, match="2-D"):
        to_qweight(raw[0], Q.Q4_0)
    with pytest.raises(ValueError, match="2-D uint8"):
        to_qweight(raw.view(np.int8), Q.Q4_0)
    with pytest.raises(ValueError, match="whole 18-byte blocks"):
        to_qweight(raw[:, :-1], Q.Q4_0)
