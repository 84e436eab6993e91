"""GGUF files: generated per family and tensor type, loaded by us and by transformers, compared; bad files refused."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import hf_greedy, hf_logits, our_prefill_logits
from gguf_files import write_gguf
from kquants import quantize
from safetensors.torch import load_file

from promptcache import LLM, SamplingParams
from promptcache.model.gguf_model import SUPPORTED_TENSOR_TYPES, GGUFModel
from promptcache.model.source import resolve_model

N = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
# Row lengths must be multiples of 256 for the K-quants: a small model with 256-wide rows.
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 64}  # fmt: skip


def prompt(seed: int, length: int, vocab: int = 8192) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(length)]


@pytest.fixture(scope="module")
def gguf_factory(model_factory, tmp_path_factory) -> Callable[..., Path]:
    """(family, qtype, hf kwargs...) -> a GGUF file converted from a random HF model of that family."""
    made: dict[str, Path] = {}

    def build(family: str, qtype: str = "Q8_0", **kwargs) -> Path:
        key = f"{family}-{qtype}-{sorted(kwargs.items())}"
        if key not in made:
            shape = dict(SHAPE)
            if family == "qwen3":
                # transformers' GGUF reader ignores qwen3.attention.key_length and assumes Qwen3's default head_dim
                # (128); our reader takes it from the file. Use 128 so that both read the same model.
                shape["head_dim"] = 128
            folder = model_factory(family, **shape, **kwargs)
            made[key] = write_gguf(folder, tmp_path_factory.mktemp("gguf") / f"{family}-{qtype}.gguf", qtype)
        return made[key]

    return build


CASES = [("llama", "Q8_0", {}), ("llama", "Q4_K", {}), ("mistral", "Q4_K", {}), ("qwen2", "Q8_0", {"tie": True}),
         ("qwen2", "Q4_K", {}), ("qwen3", "Q8_0", {}), ("qwen3", "Q4_K", {"tie": True})]  # fmt: skip
IDS = [f"{f}-{q}{'-tied' if k else ''}" for f, q, k in CASES]


@pytest.mark.parametrize(("family", "qtype", "kwargs"), CASES, ids=IDS)
def test_prefill_logits_match_transformers_on_the_same_file(gguf_factory, family, qtype, kwargs) -> None:
    path = gguf_factory(family, qtype, **kwargs)
    llm = LLM(model=str(path), num_kv_blocks=64, device="cpu", dtype="float32")
    ids = prompt(1, 200)
    torch.testing.assert_close(our_prefill_logits(llm, ids), hf_logits(path, ids), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(("family", "qtype", "kwargs"), CASES, ids=IDS)
def test_greedy_tokens_match_transformers_cold_and_with_a_prefix_hit(gguf_factory, family, qtype, kwargs) -> None:
    path = gguf_factory(family, qtype, **kwargs)
    llm = LLM(model=str(path), num_kv_blocks=64, device="cpu", dtype="float32")
    first = prompt(2, 100)
    second = first[:80] + prompt(3, 30)
    cold = llm.generate([first], GREEDY)[0]
    assert cold.token_ids == hf_greedy(path, first, N)
    assert len(set(cold.token_ids)) >= 4  # an output that varies, so equality means something
    hit = llm.generate([second], GREEDY)[0]
    assert hit.num_cached_tokens == 80
    assert hit.token_ids == hf_greedy(path, second, N)


# The error each type may add to a weight, relative to the largest weight of its row (generous: a mapping or
# permutation error is of the order of the weights themselves).
TYPE_TOLERANCE = {"F32": 1e-7, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2, "Q6_K": 3e-2, "Q5_1": 8e-2, "Q5_0": 8e-2,
                  "Q5_K": 8e-2, "Q4_1": 0.15, "Q4_0": 0.15, "Q4_K": 0.15, "Q3_K": 0.3, "Q2_K": 0.5}  # fmt: skip


@pytest.mark.parametrize("qtype", [t for t in SUPPORTED_TENSOR_TYPES if t not in ("Q2_K", "Q3_K")])
def test_every_tensor_type_dequantizes_to_the_original_weights(model_factory, tmp_path, qtype: str) -> None:
    folder = model_factory("llama", **SHAPE)
    path = write_gguf(folder, tmp_path / f"m-{qtype}.gguf", qtype)
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert qtype in types
    original = load_file(str(folder / "model.safetensors"))
    loaded = dict(GGUFModel(path).tensors(torch.float32))
    assert set(loaded) == {k for k in original if "rotary" not in k}
    for name, tensor in loaded.items():
        ref = original[name].float()
        scale = ref.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
        err = float(((tensor - ref).abs() / scale).max())
        assert err <= TYPE_TOLERANCE[qtype], f"{name}: error {err:.3g} of the row's largest weight"


def test_llama3_rope_frequencies_from_rope_freqs_match_the_hf_original(model_factory, tmp_path) -> None:
    folder = model_factory("llama3", **SHAPE)
    from promptcache.model.config import ModelConfig

    hf_cfg = ModelConfig.from_pretrained(folder)
    raw = _raw_config(folder)
    theta = hf_cfg.rope_theta
    base = ModelConfig.from_dict({**raw, "rope_scaling": None, "rope_parameters": {"rope_theta": theta}})
    factors = (base.inv_freq() / hf_cfg.inv_freq()).tolist()  # llama.cpp stores the divisors, not the formula
    path = write_gguf(folder, tmp_path / "llama3.gguf", "F32", rope_freqs=factors)
    llm = LLM(model=str(path), num_kv_blocks=64, device="cpu", dtype="float32")
    ids = prompt(4, 300)
    torch.testing.assert_close(our_prefill_logits(llm, ids), hf_logits(folder, ids), atol=2e-4, rtol=1e-4)
    assert llm.generate([ids], GREEDY)[0].token_ids == hf_greedy(folder, ids, N)


def _raw_config(folder: Path) -> dict:
    import json

    return json.loads((folder / "config.json").read_text())


# ---- what GGUF metadata gives besides weights ---------------------------------------------------------------
def test_tokenizer_and_chat_template_come_from_the_metadata(gguf_factory) -> None:
    llm = LLM(model=str(gguf_factory("qwen2", "Q8_0", tie=True)), num_kv_blocks=64)
    from promptcache.tokenizer import Tokenizer

    reference = Tokenizer.from_pretrained(Path(__file__).resolve().parent.parent / "promptcache/data/default_model")
    text = "def f(x):\n    return x * 2  # déjà vu <|im_end|>"
    assert llm.tokenizer.encode(text) == reference.encode(text)
    chat = [{"role": "user", "content": "Hi"}]
    assert llm.tokenizer.apply_chat_template(chat) == reference.apply_chat_template(chat)
    assert llm.tokenizer.token_to_id("<|im_end|>") in llm.engine.eos_token_ids


def test_fingerprint_is_stable_and_tells_files_apart(gguf_factory, model_factory, tmp_path) -> None:
    q8, q4 = gguf_factory("llama", "Q8_0"), gguf_factory("llama", "Q4_K")
    copy = shutil.copy(q8, tmp_path / "renamed.gguf")
    assert GGUFModel(q8).fingerprint() == GGUFModel(q8).fingerprint() == GGUFModel(copy).fingerprint()
    assert GGUFModel(q8).fingerprint() != GGUFModel(q4).fingerprint()
    # The same weights with other metadata (no chat template) are another model as far as the cache knows.
    no_template = write_gguf(model_factory("llama", **SHAPE), tmp_path / "no-template.gguf", chat_template=False)
    assert GGUFModel(no_template).fingerprint() != GGUFModel(q8).fingerprint()
    flipped = tmp_path / "flipped.gguf"
    raw = bytearray(Path(q8).read_bytes())
    raw[-1] ^= 0x01  # the last byte of tensor data
    flipped.write_bytes(bytes(raw))
    assert GGUFModel(flipped).fingerprint() != GGUFModel(q8).fingerprint()


def test_folder_holding_one_gguf_resolves_to_it_and_two_are_ambiguous(gguf_factory, tmp_path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(gguf_factory("llama", "Q8_0"), one / "model.gguf")
    source = resolve_model(str(one))
    assert (source.kind, source.path.name, source.name) == ("gguf", "model.gguf", "model")
    shutil.copy(gguf_factory("llama", "Q4_K"), one / "model-q4.gguf")
    with pytest.raises(ValueError, match=r"several GGUF files \(model-q4.gguf, model.gguf\)"):
        resolve_model(str(one))


# ---- bad files ---------------------------------------------------------------------------------------------
def _writer(path: Path, arch: str = "llama", tokens: bool = True) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_embedding_length(256)
    w.add_feed_forward_length(256)
    w.add_head_count(4)
    if tokens:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b"])
        w.add_token_merges(["a b"])
    return w


def _close(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def bad_truncated(path: Path, good: Path) -> str:
    path.write_bytes(Path(good).read_bytes()[: Path(good).stat().st_size * 2 // 3])
    return "truncated"


def bad_not_gguf(path: Path, good: Path) -> str:
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    return "not a GGUF file"


def bad_architecture(path: Path, good: Path) -> str:
    w = _writer(path, "falcon")
    w.add_tensor("token_embd.weight", np.zeros((2, 256), np.float32))
    _close(w)
    return "unknown GGUF architecture 'falcon'"


def bad_tensor_type(path: Path, good: Path) -> str:
    w = _writer(path)
    iq = gguf.GGMLQuantizationType.IQ4_NL
    block, size = gguf.GGML_QUANT_SIZES[iq]
    w.add_tensor("token_embd.weight", np.zeros((2, 256 // block * size), np.uint8), raw_dtype=iq)
    _close(w)
    return "tensor token_embd.weight has type IQ4_NL"


def bad_no_tokenizer(path: Path, good: Path) -> str:
    w = _writer(path, tokens=False)
    w.add_tensor("token_embd.weight", quantize(np.zeros((2, 256), np.float32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    _close(w)
    return "no tokenizer data"


BAD = [bad_truncated, bad_not_gguf, bad_architecture, bad_tensor_type, bad_no_tokenizer]


@pytest.mark.parametrize("make_bad", BAD, ids=[f.__name__ for f in BAD])
def test_bad_gguf_gets_a_clear_error_and_serving_continues(gguf_factory, tmp_path, make_bad) -> None:
    good = gguf_factory("llama", "Q8_0")
    llm = LLM(model=str(good), num_kv_blocks=64)
    before = llm.generate([prompt(5, 20)], GREEDY)[0].token_ids
    bad = tmp_path / "bad.gguf"
    words = make_bad(bad, good)
    with pytest.raises(ValueError, match=words):
        LLM(model=str(bad), num_kv_blocks=64)
    assert llm.generate([prompt(5, 20)], GREEDY)[0].token_ids == before
    assert llm.cache_stats()["blocks_in_use"] == 0


def test_cli_names_what_is_wrong_with_a_bad_gguf_without_a_traceback(gguf_factory, tmp_path) -> None:
    bad = tmp_path / "cut.gguf"
    bad_truncated(bad, gguf_factory("llama", "Q8_0"))
    run = subprocess.run([sys.executable, "-m", "promptcache.cli", "generate", "hi", "--model", str(bad)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2
    assert "truncated" in run.stderr and "Traceback" not in run.stderr
