"""Which eviction policy? Replay every workload's block trace at several cache sizes under Belady, LFU and LRU.

``python -m promptcache.bench.policy_study [--seeds 0-4] [--quick] [--half-lives 2,8,32] [--out FILE.json]``

No model runs: prompts are the workloads' own (``workloads.py``), rendered with the embedded model's chat template
and tokenizer, and each answer is synthetic text of the requested length from the workloads' text generator. As in
the engine, a conversation's next turn carries the answer's exact token ids (``replay.py``), so the traces have
the shape of the benchmark's real ones; only the answers' words differ. Each trace is replayed at fractions of its
working set (and ``pressure`` also at its own capacity) under Belady's optimal eviction and the engine's policies
(``belady.simulate``, which replays them exactly as the engine's block pool applies them).

The figure is each policy's hit ratio as a fraction of Belady's at the same capacity, averaged over seeds, with the
lowest seed beside it. Two references that no engine could run sit beside the engine's policies:
``perfect-lfu`` (use counts that survive eviction: all a policy can learn of popularity from the past) and
``popularity-oracle`` (each block's read count over the whole trace, known in advance). ``pressure x4`` is
``pressure`` with four times the requests over the same documents: a policy that learns popularity from past
requests gets more of its chance there than in the first requests of a trace, which miss under every online policy.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from promptcache.bench.belady import REFERENCE_POLICIES, TraceEntry, block_trace, simulate
from promptcache.bench.workloads import WORKLOADS, _TextGen, make_workload, request_messages
from promptcache.cache.eviction import LFU_HALF_LIFE_POOLS
from promptcache.replay import ReplayStore, render_chat_ids
from promptcache.tokenizer import Tokenizer

FRACTIONS = (0.1, 0.25, 0.5, 0.75)  # cache capacity as a fraction of the trace's working set
NAMESPACE = "study"


def workload_trace(
    tokenizer: Tokenizer, name: str, seed: int, quick: bool, block_size: int, **sizes: int
) -> tuple[list[TraceEntry], int | None]:
    """The block trace of a workload with synthetic answers, and its own capacity in blocks (None: none set)."""
    workload = make_workload(name, quick=quick, seed=seed, **sizes)
    gen = _TextGen(random.Random(seed + 7919))  # answers' words, apart from the workload's own generator
    store = ReplayStore()
    answers: dict[int, list[str]] = {}
    requests = []
    for s, k in workload.order:
        session = workload.sessions[s]
        prompt = render_chat_ids(
            tokenizer, request_messages(session, k, answers.get(s, [])), store, NAMESPACE, session.tools
        )
        n = session.steps[k].max_tokens
        output = tokenizer.encode(gen.sentences(n))[:n]
        text = tokenizer.decode(output)
        store.remember(NAMESPACE, text, output)
        answers.setdefault(s, []).append(text)
        requests.append((prompt, output))
    capacity = workload.cache_tokens // block_size if workload.cache_tokens else None
    return block_trace(requests, block_size, namespace=NAMESPACE), capacity


def study(seeds: Sequence[int], quick: bool, half_lives: Sequence[float], block_size: int = 16) -> list[dict[str, Any]]:
    """Rows of (workload, capacity, policy) -> hit ratio over Belady's, per seed."""
    from promptcache.engine.engine import DEFAULT_MODEL

    tokenizer = Tokenizer.from_pretrained(DEFAULT_MODEL)
    policies = {"lru": ("lru", LFU_HALF_LIFE_POOLS)}
    for h in half_lives:
        policies["lfu" if h == LFU_HALF_LIFE_POOLS else f"lfu (half-life {h:g})"] = ("lfu", h)
    for reference in REFERENCE_POLICIES:
        policies[reference] = (reference, LFU_HALF_LIFE_POOLS)
    cases: list[tuple[str, str, dict[str, int]]] = [(w, w, {}) for w in WORKLOADS]
    cases.append(("pressure x4", "pressure", {"requests": 4 * (40 if quick else 192)}))
    rows: list[dict[str, Any]] = []
    for label, name, sizes in cases:
        traces = {seed: workload_trace(tokenizer, name, seed, quick, block_size, **sizes) for seed in seeds}
        points: list[tuple[str, float | None]] = [(f"{f:g} of working set", f) for f in FRACTIONS]
        if name == "pressure":
            points.insert(0, ("its own (33% of the documents)", None))
        for point, fraction in points:
            ratios: dict[str, list[float]] = {p: [] for p in policies}
            for trace, own in traces.values():
                working_set = len({h for e in trace for h in e.writes})
                largest = max(len(e.writes) for e in trace)
                cap = own if fraction is None else max(largest, round(working_set * fraction))
                assert cap is not None
                best = simulate(trace, cap, block_size, "belady").hit_tokens
                for label_p, (policy, h) in policies.items():
                    got = simulate(trace, cap, block_size, policy, lfu_half_life_pools=h).hit_tokens
                    ratios[label_p].append(got / best if best else 1.0)
            summary = {p: {"mean": statistics.mean(v), "min": min(v), "per_seed": v} for p, v in ratios.items()}
            rows.append({"workload": label, "capacity": point, "seeds": list(seeds), "over_belady": summary})
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table: mean (lowest seed) of each policy's share of Belady's hits."""
    policies = list(rows[0]["over_belady"])
    head = ["workload", "cache capacity", *policies]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"{100 * r['over_belady'][p]['mean']:.1f}% ({100 * r['over_belady'][p]['min']:.0f}%)" for p in policies
        ]
        lines.append("| " + " | ".join([r["workload"], r["capacity"], *cells]) + " |")
    return "\n".join(lines)


def _seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-", 1)
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m promptcache.bench.policy_study", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--seeds", default="0-4", help="workload seeds: a range 0-4 or a list 0,3,7")
    parser.add_argument("--quick", action="store_true", help="the workloads' quick sizes")
    parser.add_argument("--half-lives", default=f"{LFU_HALF_LIFE_POOLS:g}",
                        help="LFU half-lives to compare, in uses per block of capacity (the engine's: "
                        f"{LFU_HALF_LIFE_POOLS:g})")  # fmt: skip
    parser.add_argument("--out", default=None, help="also write every number to this JSON file")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    t0 = time.perf_counter()
    half_lives = [float(h) for h in args.half_lives.split(",")]
    rows = study(_seeds(args.seeds), args.quick, half_lives)
    table = markdown(rows)
    print(table)
    if args.out:
        command = ["python", "-m", "promptcache.bench.policy_study", *(sys.argv[1:] if argv is None else argv)]
        Path(args.out).write_text(json.dumps({"command": " ".join(command), "quick": args.quick, "rows": rows,
                                              "wall_s": time.perf_counter() - t0}, indent=1) + "\n")  # fmt: skip
    print(f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
