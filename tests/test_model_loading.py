"""Model folders: what loads, what is refused and how the refusal reads; sizing of the KV cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promptcache import LLM
from promptcache.model.config import ModelConfig
from promptcache.model.loader import model_fingerprint


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture_names_the_supported_ones(model_factory, tmp_path: Path) -> None:
    folder = copy_model(model_factory("llama"), tmp_path / "m")
    raw = json.loads((folder / "config.json").read_text())
    raw["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"unsupported architecture.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(model=str(folder))


def test_unsupported_rope_scaling_is_refused() -> None:
    raw = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
    }  # fmt: skip
    with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json", "model.safetensors"])
def test_missing_file_is_named(model_factory, tmp_path: Path, missing: str) -> None:
    folder = copy_model(model_factory("llama"), tmp_path / "m")
    (folder / missing).unlink()
    with pytest.raises(ValueError, match=missing.split(".")[0]):
        LLM(model=str(folder))


def test_missing_shard_is_named(model_factory, tmp_path: Path) -> None:
    folder = copy_model(model_factory("llama", shard=True), tmp_path / "m")
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match=shard.name):
        LLM(model=str(folder))


def test_missing_weight_and_wrong_shape_are_named(model_factory, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = copy_model(model_factory("qwen2"), tmp_path / "m")
    weights = load_file(folder / "model.safetensors")
    dropped = {k: v for k, v in weights.items() if k != "model.layers.1.mlp.down_proj.weight"}
    save_file(dropped, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights: model\.layers\.1\.mlp\.down_proj\.weight"):
        LLM(model=str(folder))
    weights["model.norm.weight"] = torch.ones(3)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape"):
        LLM(model=str(folder))


def test_bfloat16_weights_load_into_a_float32_engine(model_factory, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = copy_model(model_factory("llama"), tmp_path / "m")
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(folder / "model.safetensors").items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    llm = LLM(model=str(folder), num_kv_blocks=16, dtype="float32")
    assert llm.engine.model.layers[0].input_norm.dtype == llm.engine.model.norm.dtype == torch.float32
    assert llm.generate([[1, 2, 3]])[0].token_ids


def test_fingerprint_tells_weights_apart(model_factory) -> None:
    a, b = model_factory("llama", seed=0), model_factory("llama", seed=1)
    assert model_fingerprint(a) == model_fingerprint(a)
    assert model_fingerprint(a) != model_fingerprint(b)


def test_kv_memory_per_token_is_exactly_k_and_v_of_every_layer() -> None:
    llm = LLM(kv_cache_memory_gb=0.01, dtype="float32")
    cfg = llm.engine.model_config
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    assert llm.engine.kv_bytes_per_token == per_token
    stats = llm.cache_stats()
    assert stats["kv_cache_bytes"] == stats["num_blocks"] * stats["block_size"] * per_token
    assert stats["kv_cache_bytes"] <= 0.01 * (1 << 30)
    half = LLM(kv_cache_memory_gb=0.01, dtype="bfloat16")
    assert half.engine.kv_bytes_per_token == per_token // 2


def test_default_model_has_a_long_context_and_a_chat_template() -> None:
    llm = LLM(kv_cache_memory_gb=0.01)
    assert llm.engine.max_model_len >= 8192
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "hi" in text


def test_cache_package_imports_without_torch() -> None:
    code = "import sys, promptcache.cache.manager, promptcache.cache.block_pool; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_invalid_engine_options_are_refused() -> None:
    with pytest.raises(ValueError, match="dtype"):
        LLM(dtype="float8")
    with pytest.raises(ValueError, match="scheduling policy"):
        LLM(scheduling_policy="random", kv_cache_memory_gb=0.01)
    with pytest.raises(ValueError, match="block_size"):
        LLM(block_size=0)
    with pytest.raises(TypeError, match="unknown LLM arguments: gpu_memory"):
        LLM(gpu_memory=0.9)
    with pytest.raises(ValueError, match="KV blocks"):
        LLM(num_kv_blocks=2).generate(["hello " * 40])
