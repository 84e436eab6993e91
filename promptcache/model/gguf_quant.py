"""GGUF block-quantized matrices -> ``QWeight``, reading the codes and block scales directly (no float round trip).

llama.cpp's Q8_0, Q4_0, Q4_1 and Q4_K store each 32 input features of a row as integer codes with a per-group scale
(and offset) that ``quant.QWeight`` can hold as they are, so a GGUF model can be served from its own codes instead
of being dequantized and quantized again (which would add a second rounding error and cost a dense copy).

Block layouts (little-endian; ``d``, ``m``, ``dmin`` are fp16):

- Q8_0, 34 bytes per 32 values: ``d``, 32 int8 codes. ``w = d * q``.
- Q4_0, 18 bytes per 32 values: ``d``, 16 bytes (byte ``j``: value ``j`` low nibble, value ``16 + j`` high nibble).
  ``w = d * (q - 8)``.
- Q4_1, 20 bytes per 32 values: ``d``, ``m``, 16 bytes as Q4_0. ``w = d * q + m``.
- Q4_K, 144 bytes per 256 values: ``d``, ``dmin``, 12 bytes packing eight 6-bit sub-block scales ``sc`` and mins
  ``m``, then 128 code bytes in four 64-value chunks of 32 bytes, whose low nibbles are sub-block ``2k`` and high
  nibbles sub-block ``2k + 1``. ``w = (d * sc) * q - dmin * m`` per 32-value sub-block.

Why the result is bit-exact against ``gguf.quants.dequantize``: every product involved is exact in float32 (an fp16
significand has 11 bits, a 6-bit scale and a 4- or 8-bit code add at most 14, well under float32's 24), so the only
rounding either side performs is the final addition of the offset, and ``a - b`` equals ``a + (-b)`` in IEEE
arithmetic. The scales are still computed in gguf-py's order and precision (float32 ``d * sc``), so the equality
does not depend on that argument.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from promptcache.model.quant import GROUP, QWeight

# GGUF type name -> the QWeight kind it maps onto with no requantization.
QUANT_KINDS: dict[str, str] = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4"}

_Q4_K_SUB_BLOCKS = 8  # 32-value sub-blocks per 256-value super-block
_Q4_K_SCALE_BYTES = 12  # packed 6-bit scales and mins


def to_qweight(raw: np.ndarray, qtype: gguf.GGMLQuantizationType) -> QWeight:
    """Convert a GGUF matrix's raw block bytes into a ``QWeight`` holding the same codes and scales.

    Args:
        raw: uint8 ``[out, bytes_per_row]``, one row per output feature: what ``ReaderTensor.data`` gives for a 2-D
            quantized tensor (a read-only memmap is fine; nothing of it is aliased). Stacked tensors (e.g. MoE
            experts, ``[n, out, bytes_per_row]``) must be passed one 2-D slice at a time.
        qtype: the tensor's ``gguf.GGMLQuantizationType``; one of ``QUANT_KINDS``.

    Returns:
        A ``QWeight`` of contiguous CPU tensors whose ``quant.dequantize`` is bit-identical to
        ``gguf.quants.dequantize(raw, qtype)``.

    Raises:
        ValueError: for a type not in ``QUANT_KINDS`` (naming it), or bytes that are not a 2-D uint8 array of whole
            blocks.
    """
    qtype = gguf.GGMLQuantizationType(qtype)
    if qtype.name not in QUANT_KINDS:
        raise ValueError(
            f"GGUF type {qtype.name} cannot be held as a QWeight without requantizing "
            f"(supported: {', '.join(QUANT_KINDS)})"
        )
    blocks = _blocks(raw, qtype)
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        return _q8_0(blocks)
    if qtype == gguf.GGMLQuantizationType.Q4_0:
        return _q4_0(blocks)
    if qtype == gguf.GGMLQuantizationType.Q4_1:
        return _q4_1(blocks)
    return _q4_k(blocks)


def _blocks(raw: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """``raw`` viewed as ``[out, blocks_per_row, type_size]`` (no copy), after checking it holds whole blocks."""
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise ValueError(
            f"{qtype.name} bytes must be a 2-D uint8 array [out, bytes_per_row], got {raw.dtype} {raw.shape}"
        )
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if raw.shape[1] == 0 or raw.shape[1] % type_size != 0:
        raise ValueError(f"{qtype.name} rows must be whole {type_size}-byte blocks, got {raw.shape[1]} bytes per row")
    return raw.reshape(raw.shape[0], raw.shape[1] // type_size, type_size)


def _fp16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian fp16 at byte ``offset`` of every block, widened (exactly) to float32 ``[out, blocks]``."""
    # The two bytes are strided across blocks, so gather them contiguously before reinterpreting them; astype then
    # makes a new array, so the result never aliases ``raw``.
    pair = np.ascontiguousarray(blocks[..., offset : offset + 2])
    return pair.view("<f2")[..., 0].astype(np.float32)


def _copied(view: np.ndarray) -> np.ndarray:
    """A contiguous copy of a view into ``raw``: tensors must not alias the caller's (often read-only, file-backed
    memmap) bytes, which torch cannot mark read-only and which would keep the file mapped."""
    return np.array(view, order="C", copy=True)


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A contiguous tensor over an array computed here (so already owning its memory; no copy in the usual case)."""
    return torch.from_numpy(np.ascontiguousarray(a))


def _q8_0(blocks: np.ndarray) -> QWeight:
    """Q8_0: ``w = d * q`` with int8 ``q``, which is the int8 QWeight as is."""
    out = blocks.shape[0]
    codes = _copied(blocks[..., 2:]).view(np.int8).reshape(out, -1)
    return QWeight(_tensor(codes), _tensor(_fp16(blocks, 0)), None)


def _q4_0(blocks: np.ndarray) -> QWeight:
    """Q4_0: ``w = d * (q - 8) = q * d + (-8 * d)``; the 16 code bytes already use QWeight's nibble order."""
    d = _fp16(blocks, 0)
    zero = np.float32(-8) * d  # exact: a power-of-two multiple of an fp16 value
    return QWeight(_tensor(_copied(blocks[..., 2:])), _tensor(d), _tensor(zero))


def _q4_1(blocks: np.ndarray) -> QWeight:
    """Q4_1: ``w = d * q + m``, the int4 QWeight's formula with ``scale = d``, ``zero = m``."""
    return QWeight(_tensor(_copied(blocks[..., 4:])), _tensor(_fp16(blocks, 0)), _tensor(_fp16(blocks, 2)))


def _q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack Q4_K's 12 bytes per super-block into 8 six-bit scales and 8 six-bit mins (uint8 ``[..., 8]`` each).

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3 likewise; the top 2 bits of bytes 0-3 / 4-7
    are bits 4-5 of scales 4-7 / mins 4-7, whose bits 0-3 are the low / high nibbles of bytes 8-11.
    """
    lo_sc, lo_m, nibbles = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([lo_sc & 0x3F, (nibbles & 0x0F) | ((lo_sc >> 6) << 4)], axis=-1)
    m = np.concatenate([lo_m & 0x3F, (nibbles >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return sc, m


def _q4_k(blocks: np.ndarray) -> QWeight:
    """Q4_K: per 32-value sub-block ``scale = d * sc``, ``zero = -(dmin * m)``, codes repacked to QWeight's order."""
    out, n_super, _ = blocks.shape
    d, dmin = _fp16(blocks, 0), _fp16(blocks, 2)  # [out, n_super]
    sc, m = _q4_k_scales(blocks[..., 4 : 4 + _Q4_K_SCALE_BYTES])  # [out, n_super, 8]
    # float32 products in gguf-py's order (d * sc, then dmin * m negated), so each group's numbers are its numbers.
    scale = d[..., None] * sc.astype(np.float32)
    zero = -(dmin[..., None] * m.astype(np.float32))

    # Code bytes as [out, super, chunk k (64 values), half h (values 0-15 / 16-31 of each sub-block), j]: byte
    # 32k + 16h + j holds value 16h + j of sub-block 2k (low nibble) and of sub-block 2k + 1 (high nibble). QWeight
    # wants, per sub-block, byte j = value j (low) | value 16 + j (high): pair the two halves nibble by nibble.
    qs = blocks[..., 4 + _Q4_K_SCALE_BYTES :].reshape(out, n_super, 4, 2, 16)
    even = (qs[..., 0, :] & 0x0F) | ((qs[..., 1, :] & 0x0F) << 4)  # sub-block 2k
    odd = (qs[..., 0, :] >> 4) | (qs[..., 1, :] & 0xF0)  # sub-block 2k + 1
    codes = np.stack([even, odd], axis=-2)  # [out, super, 4, 2, 16]: sub-blocks in order 2k, 2k + 1

    groups = n_super * _Q4_K_SUB_BLOCKS
    return QWeight(
        _tensor(codes.reshape(out, groups, GROUP // 2)),
        _tensor(scale.reshape(out, groups)),
        _tensor(zero.reshape(out, groups)),
    )
