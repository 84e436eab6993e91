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
from promptcache.model.llama import LAYER_MATRICES, LlamaForCausalLM, set_matrix
from promptcache.model.quant import QUANTIZATIONS, QWeight, can_quantize, dequantize, quantize, stored_kind

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


def load_model(
    source: ModelSource, dtype: torch.dtype, device: torch.device, max_len: int, quantization: str = "none"
) -> LlamaForCausalLM:
    """Build the model of ``source`` and copy every weight into place (quantized as ``quantization`` says)."""
    tensors = source.tensors(dtype, quantization)
    return build_model(source.config(), tensors, dtype, device, max_len, str(source.path), quantization)


# HF name suffix -> (our parameter, its column range or stack index; None for the whole) within each layer.
def _layer_map(cfg: ModelConfig) -> dict[str, tuple[str, slice | int | None]]:
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
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


MATRICES = (*LAYER_MATRICES, "lm_head")  # the projections that may be stored quantized


def build_model(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor | QWeight]],
    dtype: torch.dtype,
    device: torch.device,
    max_len: int,
    origin: str,
    quantization: str = "none",
) -> LlamaForCausalLM:
    """Build the model for ``cfg`` from HF-named ``tensors``, fusing q/k/v and gate/up; ``origin`` names the
    weights' file or folder in errors.

    ``quantization``: ``none`` keeps every matrix dense; ``int8`` / ``int4`` quantize the projections and the LM
    head (a ``QWeight`` already of that kind, straight from a GGUF file, is kept as it is); ``auto`` keeps the
    ``QWeight``s the source yields (a GGUF's own precision) and the dense matrices dense.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    model = LlamaForCausalLM(cfg, dtype, device, max_len)
    layer_map = _layer_map(cfg)
    expected: set[str] = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        expected.add("lm_head.weight")
    for i, layer in enumerate(model.layers):
        for suffix, (attr, _) in layer_map.items():
            if getattr(layer, attr) is not None:
                expected.add(f"model.layers.{i}.{suffix}")
    loaded: set[str] = set()
    # Matrices that may end up quantized are gathered part by part ([out, in] each) and stored once complete.
    pending: dict[tuple[torch.nn.Module, str], dict[int, tuple[slice | int | None, torch.Tensor | QWeight]]] = {}
    with torch.no_grad():
        for name, tensor in tensors:
            target = _target(model, name, layer_map)
            if target is None:
                continue  # e.g. rotary inv_freq buffers or an lm_head that tied embeddings make redundant
            owner, attr, rows = target
            param = getattr(owner, attr)
            loaded.add(name)
            if attr in MATRICES and (quantization != "none" or isinstance(tensor, QWeight)):
                _check_shape(name, _part_shape(param, rows), _shape(tensor))
                kind = stored_kind(quantization, head=attr == "lm_head")
                if kind is not None and not isinstance(tensor, QWeight) and can_quantize(tensor):
                    tensor = quantize(tensor, kind)  # now, so at most one dense part waits in memory
                order = rows if isinstance(rows, int) else 0 if rows is None else rows.start
                got = pending.setdefault((owner, attr), {})
                got[order] = (rows, tensor)
                if len(got) == _PARTS.get(attr, 1):
                    _store(owner, attr, [got.pop(k) for k in sorted(got)], quantization, device)
                    del pending[(owner, attr)]
                continue
            _copy_dense(param, rows, tensor, name)
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"model {origin} lacks weights: {shown}")
    return model.eval()


_PARTS = {"qkv": 3, "gate_up": 2}  # checkpoint tensors fused into one of our matrices


def _copy_dense(param: torch.Tensor, rows: slice | int | None, tensor: torch.Tensor | QWeight, name: str) -> None:
    """Copy a checkpoint tensor into (a row block of) a dense parameter; both are [out, in] for matrices."""
    if isinstance(tensor, QWeight):
        tensor = dequantize(tensor, param.dtype)
    dst = param if rows is None else param[_row_block(param, rows)]
    _check_shape(name, tuple(dst.shape), tuple(tensor.shape))
    dst.copy_(tensor)


def _row_block(param: torch.Tensor, rows: slice | int) -> slice:
    """The rows a fused part occupies: a slice as given, or gate (0) / up (1) as the two halves of gate_up."""
    if isinstance(rows, slice):
        return rows
    half = param.shape[0] // 2
    return slice(rows * half, (rows + 1) * half)


def _store(
    owner: torch.nn.Module,
    attr: str,
    parts: list[tuple[slice | int | None, torch.Tensor | QWeight]],
    quantization: str,
    device: torch.device,
) -> None:
    """Store a complete matrix: quantized if any part is (or ``quantization`` asks for it), else dense."""
    wanted = any(isinstance(t, QWeight) for _, t in parts) or quantization in ("int8", "int4")
    # inputs that are not whole groups keep the matrix dense
    if not wanted or not all(isinstance(t, QWeight) or can_quantize(t) for _, t in parts):
        param = getattr(owner, attr)
        for rows, t in parts:
            _copy_dense(param, rows, t, attr)
        return
    kind = stored_kind(quantization, head=attr == "lm_head") or "int8"
    qparts = [t if isinstance(t, QWeight) else quantize(t, kind) for _, t in parts]
    set_matrix(owner, attr, _fuse(qparts).to(device))


def _shape(t: torch.Tensor | QWeight) -> tuple[int, int]:
    return (t.out_features, t.in_features) if isinstance(t, QWeight) else (t.shape[0], t.shape[1])


def _part_shape(param: torch.Tensor, rows: slice | int | None) -> tuple[int, ...]:
    """The [out, in] shape the checkpoint part of ``param`` at ``rows`` must have."""
    return tuple(param.shape) if rows is None else tuple(param[_row_block(param, rows)].shape)


def _check_shape(name: str, expected: tuple[int, ...], got: tuple[int, ...]) -> None:
    if expected != got:
        raise ValueError(f"weight {name} has shape {got}, which does not fit the config (expected {expected})")


def _fuse(pieces: list[QWeight]) -> QWeight:
    """Stack the row blocks (q|k|v, gate|up) of one matrix. Parts of different kinds (a K-quant mix may store v
    in a type that has no exact kernel) are all stored int8: the more precise kind, within half an int8 step."""
    if len({p.kind for p in pieces}) > 1:
        pieces = [p if p.kind == "int8" else quantize(dequantize(p), "int8") for p in pieces]
    if len(pieces) == 1:
        return pieces[0]
    zero = None if pieces[0].zero is None else torch.cat([p.zero for p in pieces])  # type: ignore[misc]
    return QWeight(torch.cat([p.q for p in pieces]), torch.cat([p.scale for p in pieces]), zero)


def _target(
    model: LlamaForCausalLM, name: str, layer_map: dict[str, tuple[str, slice | int | None]]
) -> tuple[torch.nn.Module, str, slice | int | None] | None:
    """Where a checkpoint tensor goes: (module, attribute, column range or stack index)."""
    if name == "model.embed_tokens.weight":
        # Tied: the embedding is the LM head (its [vocab, hidden] rows are the head's [out, in]).
        return (model, "lm_head", None) if model.embed is None else (model, "embed", None)
    if name == "model.norm.weight":
        return model, "norm", None
    if name == "lm_head.weight":
        return None if model.cfg.tie_word_embeddings else (model, "lm_head", None)
    if not name.startswith("model.layers."):
        return None
    idx, _, suffix = name[len("model.layers.") :].partition(".")
    entry = layer_map.get(suffix)
    if entry is None or int(idx) >= len(model.layers):
        return None
    layer = model.layers[int(idx)]
    return None if getattr(layer, entry[0]) is None else (layer, entry[0], entry[1])


def weight_precision(model: LlamaForCausalLM) -> str:
    """How the model's matrices are stored: ``dense`` or e.g. ``int4 (lm_head int8)``, ``int4+int8 (mixed)``."""
    matrices = (getattr(layer, name) for layer in model.layers for name in LAYER_MATRICES)
    layers = {m.kind if isinstance(m, QWeight) else "dense" for m in matrices}
    head = model.lm_head.kind if isinstance(model.lm_head, QWeight) else "dense"
    body = "+".join(sorted(layers)) if len(layers) > 1 else next(iter(layers))
    return body if head == body else f"{body} (lm_head {head})"


def precision_fingerprint(fingerprint: str, precision: str) -> str:
    """The cache root for weights run at ``precision``: dense keeps the file's fingerprint (so caches written before
    quantization existed stay valid), anything else gets its own."""
    if precision == "dense":
        return fingerprint
    return hashlib.sha256(f"{fingerprint}|{precision}".encode()).hexdigest()
