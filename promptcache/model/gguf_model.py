"""Read a GGUF file (llama.cpp's format) into what the engine needs: a config, named weights and a fingerprint.

The ``gguf`` package (llama.cpp's own Python reader and dequantizers) parses the file; this module maps its
metadata onto a Hugging Face-style config and its tensor names onto Hugging Face names, so that everything after
loading (``ModelConfig``, ``load_model``) is shared with safetensors folders. Quantized tensors are dequantized
once, at load, into the engine's dtype: our forward runs dense matrices.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptcache.model.quant import QWeight, stored_kind

# GGUF architecture -> the Hugging Face architecture whose config fields and weights we map it to.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# Tensor types we dequantize (through gguf.quants). The K-quant mixes (Q4_K_M, Q5_K_M, Q3_K_M ...) combine
# Q2_K..Q6_K with Q8_0 / F16 / F32, so those come along; i-quants and ternary types are refused by name.
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HEAD_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_SPLIT_FILE = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


class GGUFModel:
    """One GGUF file: its metadata as a HF-style config, its tensors under HF names, its tokenizer and fingerprint.

    Raises ValueError, naming the file and what is wrong, for a file that is not GGUF, is truncated, has an
    architecture or tensor type we do not run, or lacks tokenizer data.
    """

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"GGUF file {self.path} does not exist")
        if _SPLIT_FILE.search(self.path.name):
            raise ValueError(f"{self.path.name} is one part of a split GGUF; merge the parts with llama-gguf-split")
        size = self.path.stat().st_size
        with self.path.open("rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as exc:  # the reader fails deep inside numpy on a short file (reshape, index errors)
            raise ValueError(f"{self.path} is truncated or corrupt ({size:,} bytes): {exc}") from exc
        end = max((t.data_offset + int(t.n_bytes) for t in self.reader.tensors), default=self.reader.data_offset)
        if end > size:
            raise ValueError(f"{self.path} is truncated: its tensors need {end:,} bytes, the file has {size:,}")
        self.arch = str(self._field("general.architecture", ""))
        if self.arch not in GGUF_ARCHITECTURES:
            raise ValueError(
                f"{self.path.name}: unknown GGUF architecture {self.arch!r}; promptcache runs "
                f"{', '.join(GGUF_ARCHITECTURES)}"
            )
        for t in self.reader.tensors:
            if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
                raise ValueError(
                    f"{self.path.name}: tensor {t.name} has type {t.tensor_type.name}, which promptcache does not "
                    f"load; supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
                )
        self._tensors = {t.name: t for t in self.reader.tensors}
        if "tokenizer.ggml.tokens" not in self.reader.fields:
            raise ValueError(f"{self.path.name} has no tokenizer data (tokenizer.ggml.tokens is missing)")

    # ---- metadata ---------------------------------------------------------------------------------------------
    def _field(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _arch_field(self, key: str, default: Any = None) -> Any:
        return self._field(f"{self.arch}.{key}", default)

    @property
    def name(self) -> str:
        """The model's name: the file name without ``.gguf``."""
        return self.path.stem

    @functools.cached_property
    def _config(self) -> dict[str, Any]:
        return self._read_config()

    def config_dict(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` equivalent built from the metadata (llama.cpp's key names)."""
        return dict(self._config)

    def _read_config(self) -> dict[str, Any]:
        required = {
            "block_count": "num_hidden_layers",
            "embedding_length": "hidden_size",
            "feed_forward_length": "intermediate_size",
            "attention.head_count": "num_attention_heads",
        }
        raw: dict[str, Any] = {"architectures": [GGUF_ARCHITECTURES[self.arch]], "model_type": self.arch}
        for key, hf_key in required.items():
            value = self._arch_field(key)
            if value is None:
                raise ValueError(f"{self.path.name} lacks the metadata key {self.arch}.{key}")
            raw[hf_key] = int(value)
        kv_heads = self._arch_field("attention.head_count_kv", raw["num_attention_heads"])
        if isinstance(kv_heads, list):  # per-layer counts; ours is one shape for every layer
            if len(set(kv_heads)) != 1:
                raise ValueError(f"{self.path.name}: per-layer KV head counts {sorted(set(kv_heads))} are unsupported")
            kv_heads = kv_heads[0]
        raw["num_key_value_heads"] = int(kv_heads)
        raw["head_dim"] = int(
            self._arch_field("attention.key_length", raw["hidden_size"] // raw["num_attention_heads"])
        )
        embed = self._tensors.get("token_embd.weight")
        if embed is None:
            raise ValueError(f"{self.path.name} has no token_embd.weight tensor")
        raw["vocab_size"] = int(self._arch_field("vocab_size", int(embed.shape[1])))
        raw["max_position_embeddings"] = int(self._arch_field("context_length", 2048))
        raw["rms_norm_eps"] = float(self._arch_field("attention.layer_norm_rms_epsilon", 1e-5))
        raw["rope_theta"] = float(self._arch_field("rope.freq_base", 10000.0))
        raw["tie_word_embeddings"] = "output.weight" not in self._tensors
        raw["attention_bias"] = "blk.0.attn_q.bias" in self._tensors
        scaling = self._arch_field("rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise ValueError(f"{self.path.name}: rope scaling {scaling!r} is unsupported (supported: linear)")
            raw["rope_scaling"] = {"rope_type": "linear", "factor": float(self._arch_field("rope.scaling.factor"))}
        if "rope_freqs.weight" in self._tensors:
            # Llama 3.1-style scaling is stored as per-frequency divisors (llama.cpp's rope_freqs), not parameters.
            raw["rope_freq_factors"] = self._dequantize("rope_freqs.weight").reshape(-1).tolist()
        window = self._arch_field("attention.sliding_window")
        if window:
            raw["sliding_window"] = int(window)
        raw["bos_token_id"] = self._field("tokenizer.ggml.bos_token_id")
        raw["torch_dtype"] = "float32"
        return raw

    def tokenizer(self) -> Any:
        """The tokenizer described by the metadata (vocabulary, merges, specials, chat template)."""
        from promptcache.model.gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(self.reader, source=self.path.name)

    def fingerprint(self) -> str:
        """Header, metadata and tensor table, plus the first and last MiB of tensor data (as for safetensors)."""
        h = hashlib.sha256(b"gguf")
        size = self.path.stat().st_size
        h.update(size.to_bytes(8, "little"))
        with self.path.open("rb") as fh:
            h.update(fh.read(self.reader.data_offset))
            h.update(fh.read(1 << 20))
            fh.seek(max(self.reader.data_offset, size - (1 << 20)))
            h.update(fh.read(1 << 20))
        return h.hexdigest()

    # ---- weights ----------------------------------------------------------------------------------------------
    def _dequantize(self, name: str) -> np.ndarray:
        from gguf import quants

        t = self._tensors[name]
        array = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        # F32 tensors come back as read-only views of the memory-mapped file; torch wants writable memory.
        return array if array.flags.writeable else array.copy()

    def tensors(self, dtype: torch.dtype, quantization: str = "none") -> Iterator[tuple[str, torch.Tensor | QWeight]]:
        """Every weight under its Hugging Face name; one tensor in memory at a time.

        A matrix whose type maps exactly onto a quantized kernel (``gguf_quant.QUANT_KINDS``) comes as a ``QWeight``
        of its own codes when ``quantization`` is ``auto`` or names that kind; everything else is dequantized to
        ``dtype``. llama.cpp's converter permutes the rows of q and k for llama-architecture models (it interleaves
        the two RoPE halves of each head, GPT-J style); this undoes it, so our rotate-half RoPE sees HF's layout.
        """
        from promptcache.model.gguf_quant import QUANT_KINDS, to_qweight

        heads, kv_heads = self._config["num_attention_heads"], self._config["num_key_value_heads"]
        for name in self._tensors:
            hf_name = _hf_name(name)
            if hf_name is None:
                continue  # rope_freqs (read into the config) and tensors our architectures do not use
            t = self._tensors[name]
            permuted = self.arch == "llama" and (".attn_q." in name or ".attn_k." in name)
            n_head = heads if ".attn_q." in name else kv_heads
            kind = QUANT_KINDS.get(t.tensor_type.name)
            wanted = stored_kind(quantization, head=hf_name in _HEAD_NAMES)
            if kind is not None and (quantization == "auto" or wanted == kind) and len(t.shape) == 2:
                w = to_qweight(np.asarray(t.data), t.tensor_type)
                if permuted:
                    w = QWeight(*(None if x is None else _unpermute_rows_t(x, n_head) for x in w))
                yield hf_name, w
                continue
            array = self._dequantize(name)
            if permuted:
                array = _unpermute_rows(array, n_head)
            yield hf_name, torch.from_numpy(array).to(dtype)


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK.fullmatch(name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: per head, rows (i, half) interleaved back to (half, i)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_rows_t(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """``_unpermute_rows`` for the row-indexed tensors of a ``QWeight`` (codes, scales, offsets)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()
