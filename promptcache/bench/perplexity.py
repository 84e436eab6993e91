"""Perplexity on a fixed text that ships with Python: the quality check for quantized weights and lower precision.

The text is the module docstrings of ``argparse``, ``json``, ``heapq`` and ``subprocess`` (about 2,200 SmolLM2
tokens of English and code), so every machine with the same Python evaluates exactly the same tokens and no data
has to be downloaded.

``python -m promptcache.bench.perplexity [--model M] [--quantization ...] [--dtype ...]`` prints one line per
setting.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import subprocess

import torch
import torch.nn.functional as F

from promptcache.model.context import ForwardContext, PrefillSlice
from promptcache.model.llama import LlamaForCausalLM

TEXT_MODULES = (argparse, json, heapq, subprocess)


def reference_text() -> str:
    """The evaluation text: the listed stdlib modules' docstrings, joined by blank lines."""
    return "\n\n".join((m.__doc__ or "").strip() for m in TEXT_MODULES)


@torch.inference_mode()
def perplexity(model: LlamaForCausalLM, ids: list[int], logits_rows: int = 256) -> float:
    """exp(mean negative log-likelihood) of ``ids[1:]`` given their prefixes, in one cold prefill.

    Uses its own scratch KV tensor (slot i holds position i), so no engine, pool or cache is involved."""
    cfg = model.cfg
    n = len(ids)
    device = model.norm.device
    kv = torch.empty(cfg.num_layers, 2, n, cfg.num_kv_heads, cfg.head_dim, dtype=model.dtype, device=device)
    positions = torch.arange(n, device=device)
    ctx = ForwardContext(
        positions=positions,
        slot_mapping=positions,
        num_decode=0,
        decode_slots=None,
        decode_mask=None,
        prefills=[PrefillSlice(0, n, None, None)],
        logits_indices=positions,
    )
    hidden = model(torch.tensor(ids, device=device), ctx, kv)
    targets = torch.tensor(ids[1:], device=device)
    nll = 0.0
    for start in range(0, n - 1, logits_rows):  # logits of every row at once would take n x vocab x 4 bytes
        end = min(start + logits_rows, n - 1)
        logits = model.compute_logits(hidden[start:end])
        nll += float(F.cross_entropy(logits, targets[start:end], reduction="sum"))
    return math.exp(nll / (n - 1))


def main(argv: list[str] | None = None) -> int:
    from promptcache.engine.engine import EngineConfig
    from promptcache.model.loader import build_model, load_model, weight_precision
    from promptcache.model.quant import QUANTIZATIONS
    from promptcache.model.source import resolve_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--quantization", nargs="+", default=["none", "int8", "int4", "auto"], choices=QUANTIZATIONS)
    parser.add_argument("--dtype", nargs="+", default=["float32"])
    parser.add_argument("--requantize", action="store_true",
                        help="also quantize the fully dequantized weights (our own int8/int4 quantizer on every "
                             "matrix, as for a safetensors model)")  # fmt: skip
    args = parser.parse_args(argv)
    source = resolve_model(args.model)
    ids = source.tokenizer().encode(reference_text())
    for dtype_name in args.dtype:
        dtype = EngineConfig(dtype=dtype_name).resolved_dtype(torch.device("cpu"))
        for quantization in args.quantization:
            model = load_model(source, dtype, torch.device("cpu"), len(ids), quantization)
            ppl = perplexity(model, ids)
            print(f"{source.name} {dtype_name} {quantization} ({weight_precision(model)}): "
                  f"perplexity {ppl:.4f} over {len(ids)} tokens", flush=True)  # fmt: skip
            if args.requantize and quantization in ("int8", "int4"):
                tensors = source.tensors(dtype, "none")
                model = build_model(source.config(), tensors, dtype, torch.device("cpu"), len(ids), "", quantization)
                print(f"{source.name} {dtype_name} {quantization} requantized from dense: "
                      f"perplexity {perplexity(model, ids):.4f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
