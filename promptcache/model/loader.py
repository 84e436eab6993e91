"""Load a model (a Hugging Face folder of safetensors, or a GGUF file) into ``LlamaForCausalLM``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from promptcache.model.config import ModelConfig
from promptcache.model.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from promptcache.model.source import ModelSource

REQUIRED_FILES = ("config.json", "tokenizer.json")


def check_model_folder(path: str | Path) -> Path:
    """Fail early, naming what is missing, if ``path`` is not a usable Hugging Face model folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"model folder {folder} does not exist")
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if not weight_files(folder):
        missing.append("*.safetensors (model.safetensors, or shards with model.safetensors.index.json)")
    if missing:
        raise ValueError(f"model folder {folder} is missing: {', '.join(missing)}")
    return folder


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model: those named by the index if there is one, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"model folder {folder} is missing shards named by its index: {', '.join(absent)}")
        return files
    return sorted(folder.glob("*.safetensors"))


def model_fingerprint(folder: Path) -> str:
    """A stable identity for the weights, the root of every cache address: config plus each file's header and ends.

    Reading whole multi-GB files would slow start-up; the safetensors header (names, shapes, dtypes, offsets)
    plus the first and last MiB of data tell models apart in practice and are the same on every replica.
    """
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in weight_files(folder):
        size = f.stat().st_size
        h.update(f.name.encode() + size.to_bytes(8, "little"))
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def hf_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a Hugging Face folder's safetensors files, under its own name, one at a time."""
    for f in weight_files(folder):
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, st.get_tensor(name)


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device, max_len: int) -> LlamaForCausalLM:
    """Build the model of ``source`` and copy every weight into place."""
    return build_model(source.config(), source.tensors(dtype), dtype, device, max_len, str(source.path))


def build_model(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device,
    max_len: int,
    origin: str,
) -> LlamaForCausalLM:
    """Build the model for ``cfg`` from HF-named ``tensors``, fusing q/k/v and gate/up; ``origin`` names the
    weights' file or folder in errors."""
    model = LlamaForCausalLM(cfg, dtype, device, max_len)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    # HF name suffix -> (our parameter, its column range or stack index; None for the whole) within each layer.
    layer_map = {
        "input_layernorm.weight": ("input_norm", None),
        "post_attention_layernorm.weight": ("post_norm", None),
        "self_attn.q_proj.weight": ("qkv", slice(0, q)),
        "self_attn.k_proj.weight": ("qkv", slice(q, q + kv)),
        "self_attn.v_proj.weight": ("qkv", slice(q + kv, q + 2 * kv)),
        "self_attn.q_proj.bias": ("qkv_bias", slice(0, q)),
        "self_attn.k_proj.bias": ("qkv_bias", slice(q, q + kv)),
        "self_attn.v_proj.bias": ("qkv_bias", slice(q + kv, q + 2 * kv)),
        "self_attn.q_norm.weight": ("q_norm", None),
        "self_attn.k_norm.weight": ("k_norm", None),
        "self_attn.o_proj.weight": ("o", None),
        "mlp.gate_proj.weight": ("gate_up", 0),
        "mlp.up_proj.weight": ("gate_up", 1),
        "mlp.down_proj.weight": ("down", None),
    }
    expected: set[str] = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        expected.add("lm_head.weight")
    for i, layer in enumerate(model.layers):
        for suffix, (attr, _) in layer_map.items():
            if getattr(layer, attr) is not None:
                expected.add(f"model.layers.{i}.{suffix}")
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in tensors:
            target = _target(model, name, layer_map)
            if target is None:
                continue  # e.g. rotary inv_freq buffers or an lm_head that tied embeddings make redundant
            param, rows = target
            if isinstance(rows, int):  # gate/up: one [in, out] matrix of a stacked pair
                tensor, dst = tensor.t(), param[rows]
            elif tensor.dim() == 2 and param is not model.embed:
                tensor = tensor.t()  # our matrices are [in, out]; fused parts are column ranges
                dst = param if rows is None else param[:, rows]
            else:
                dst = param if rows is None else param[rows]
            if dst.shape != tensor.shape:
                raise ValueError(
                    f"weight {name} has shape {tuple(tensor.shape)}, which does not fit the config "
                    f"(expected {tuple(dst.shape)})"
                )
            dst.copy_(tensor)
            loaded.add(name)
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"model {origin} lacks weights: {shown}")
    return model.eval()


def _target(
    model: LlamaForCausalLM, name: str, layer_map: dict[str, tuple[str, slice | int | None]]
) -> tuple[torch.Tensor, slice | int | None] | None:
    if name == "model.embed_tokens.weight":
        return model.embed, None
    if name == "model.norm.weight":
        return model.norm, None
    if name == "lm_head.weight":
        return None if model.cfg.tie_word_embeddings else (model.lm_head, None)
    if not name.startswith("model.layers."):
        return None
    idx, _, suffix = name[len("model.layers.") :].partition(".")
    entry = layer_map.get(suffix)
    if entry is None or int(idx) >= len(model.layers):
        return None
    param = getattr(model.layers[int(idx)], entry[0])
    return None if param is None else (param, entry[1])
