"""Write small GGUF files for tests: a Hugging Face folder converted as llama.cpp's converter would.

``write_gguf`` takes a folder made by ``conftest.make_model`` (random weights, the embedded byte-level BPE tokenizer)
and writes its metadata, tokenizer and tensors with ``gguf.GGUFWriter``: matrices quantized to the requested type,
norms in F32, and q/k rows permuted for the llama architecture exactly as ``convert_hf_to_gguf.py`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from kquants import quantize
from safetensors.torch import load_file

# HF model_type -> GGUF architecture (Mistral is written as llama, as llama.cpp's converter does).
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation for llama-architecture files (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    idx, _, suffix = hf_name[len("model.layers.") :].partition(".")
    return f"blk.{idx}.{_LAYER[suffix]}"


def write_gguf(
    folder: Path,
    out: Path,
    qtype: str = "Q8_0",
    *,
    rope_freqs: list[float] | None = None,
    add_bos: bool = False,
    chat_template: bool = True,
) -> Path:
    """Convert the HF folder ``folder`` to ``out`` with 2-D weights in ``qtype`` (``F32``, ``F16``, ``Q8_0``,
    ``Q4_K``, ...); ``rope_freqs`` writes llama.cpp's per-frequency divisors (Llama 3.1-style scaling)."""
    cfg = json.loads((folder / "config.json").read_text())
    arch = GGUF_ARCH[cfg["model_type"]]
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(out, arch)
    w.add_name(folder.name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e4)))
    w.add_vocab_size(cfg["vocab_size"])
    _write_tokenizer(w, folder, add_bos, chat_template)
    quant = gguf.GGMLQuantizationType[qtype]
    tensors = load_file(str(folder / "model.safetensors"))
    for hf_name, tensor in tensors.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        array = tensor.to(torch.float32).numpy()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            array = permute_rows(array, heads)
        elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            array = permute_rows(array, kv_heads)
        if array.ndim == 2 and quant not in (gguf.GGMLQuantizationType.F32,):
            if quant == gguf.GGMLQuantizationType.F16:
                w.add_tensor(_gguf_name(hf_name), array.astype(np.float16))
            else:
                w.add_tensor(_gguf_name(hf_name), quantize(array, quant), raw_dtype=quant)
        else:
            w.add_tensor(_gguf_name(hf_name), np.ascontiguousarray(array, dtype=np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _write_tokenizer(w: gguf.GGUFWriter, folder: Path, add_bos: bool, chat_template: bool) -> None:
    """The folder's byte-level BPE tokenizer as gpt2-type metadata (vocabulary, merges, token types, specials)."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {a["content"]: a for a in tok["added_tokens"]}
    for content, a in added.items():
        vocab[content] = a["id"]
    tokens = [""] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        tokens[i] = piece
    types = [
        int(gguf.TokenType.CONTROL if added[t]["special"] else gguf.TokenType.USER_DEFINED)
        if t in added
        else int(gguf.TokenType.NORMAL)
        for t in tokens
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")  # the embedded tokenizer's split regex is Qwen2's
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(add_bos)
    if chat_template:
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
        w.add_chat_template(tok_cfg["chat_template"])
