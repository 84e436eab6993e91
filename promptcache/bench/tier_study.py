"""Which write policy for the tiers below the device pool? Replay every workload through device, host and disk or Redis.

``python -m promptcache.bench.tier_study [--seeds 0-2] [--quick] [--workloads chat,pressure-x4] [--out FILE.json]``

No model runs: the traces are ``policy_study``'s (the workloads' own prompts with synthetic answers, token-exact
across turns), replayed by ``belady.simulate_tiers``. The device pool holds 1/10 of the trace's working set (at
least its largest request) under the engine's LFU, host memory 1/10 (LRU, the device's victim cache), and under
them one persistent tier at 1/2 of the working set or unbounded, filled by each write policy in turn (those of
``belady.WRITE_POLICIES``, the hybrid ``write-through+back`` among them, then its variant that does not refresh a
block still present when it leaves memory):

- ``disk``: one replica's own local disk.
- ``redis``: shared by two replicas, the requests alternating between them (round-robin, no session affinity: the
  worst case for locality, where a conversation's next turn usually runs on the other replica).

Figures, each the mean over seeds with the lowest seed beside it where a table shows one:

- hit tokens as a share of the unbounded cache's (one replica, ``simulate`` with room for the whole working set,
  LFU), in all and split by the tier that served them;
- blocks written to the persistent tier per request (its write traffic);
- the restart figure: the trace replayed a second time after a restart of every replica (device and host lost,
  disk and Redis kept), second pass hits / first pass hits; and the restart's loss, 1 - the second pass's hits over
  those of the same second pass without a restart.

A row with no persistent tier (device and host alone) is the reference each policy adds to. ``pressure x4`` is
``pressure`` with four times the requests over the same documents, as in ``policy_study``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from promptcache.bench.belady import (
    DEVICE,
    HOST_TIER,
    WRITE_POLICIES,
    WRITE_POLICY_VARIANTS,
    TierSpan,
    TraceEntry,
    second_pass,
    simulate,
)
from promptcache.bench.policy_study import _seeds, workload_trace
from promptcache.bench.workloads import WORKLOADS
from promptcache.tokenizer import Tokenizer

DEVICE_FRACTION = 0.1  # of the working set, at least the largest request (the engine must hold one request)
HOST_FRACTION = 0.1
LOWER_FRACTIONS: tuple[float | None, ...] = (0.5, None)  # the persistent tier; None: unbounded
LOWER_TIERS = {"disk": 1, "redis": 2}  # persistent tier -> replicas sharing it (disk is each replica's own)
NO_POLICY = "none (device + host)"
# The write policies replayed: the engine's candidates, then the hybrid's variant without the refresh.
STUDY_POLICIES = (*WRITE_POLICIES, *WRITE_POLICY_VARIANTS)
FIGURES = ("share", "device", "host", "lower", "writes_per_request", "restart_second_over_first", "restart_loss")


def _cases(quick: bool) -> list[tuple[str, str, dict[str, int]]]:
    """(label, workload, size overrides) of every trace the study replays."""
    cases: list[tuple[str, str, dict[str, int]]] = [(w, w, {}) for w in WORKLOADS]
    cases.append(("pressure x4", "pressure", {"requests": 4 * (40 if quick else 192)}))
    return cases


def _figures(
    trace: Sequence[TraceEntry], unbounded: int, lower: str | None, restarted: TierSpan, first: TierSpan,
    kept: TierSpan,
) -> dict[str, float]:  # fmt: skip
    """One replay's figures (see the module docstring); ``first``, ``restarted``, ``kept``: the first pass, and the
    second pass with and without a restart."""
    by_tier = first.hit_tokens_by_tier
    return {
        "share": first.hit_tokens / unbounded if unbounded else 1.0,
        "device": by_tier[DEVICE] / unbounded if unbounded else 0.0,
        "host": by_tier[HOST_TIER] / unbounded if unbounded else 0.0,
        "lower": by_tier[lower] / unbounded if lower and unbounded else 0.0,
        "writes_per_request": first.blocks_written_by_tier[lower] / len(trace) if lower else 0.0,
        "host_writes_per_request": first.blocks_written_by_tier[HOST_TIER] / len(trace),
        "restart_second_over_first": restarted.hit_tokens / first.hit_tokens if first.hit_tokens else 0.0,
        "restart_loss": 1 - restarted.hit_tokens / kept.hit_tokens if kept.hit_tokens else 0.0,
    }


def study(
    seeds: Sequence[int], quick: bool, workloads: Sequence[str] | None = None, block_size: int = 16
) -> dict[str, Any]:
    """Every workload's rows (persistent tier, its size, write policy) -> figures per seed, and the traces' sizes."""
    from promptcache.engine.engine import DEFAULT_MODEL

    tokenizer = Tokenizer.from_pretrained(DEFAULT_MODEL)
    rows: list[dict[str, Any]] = []
    traces_info: list[dict[str, Any]] = []
    for label, name, sizes in _cases(quick):
        if workloads is not None and label not in workloads:
            continue
        per_seed: dict[tuple[str, str, str], list[dict[str, float]]] = {}
        info: dict[str, Any] = {"workload": label, "per_seed": []}
        for seed in seeds:
            trace, _ = workload_trace(tokenizer, name, seed, quick, block_size, **sizes)
            working_set = len({a for e in trace for a in e.writes})
            device = max(max(len(e.writes) for e in trace), round(working_set * DEVICE_FRACTION))
            host = round(working_set * HOST_FRACTION)
            unbounded = simulate(trace, working_set, block_size, "lfu").hit_tokens
            twice = simulate([*trace, *trace], working_set, block_size, "lfu").per_request_hit_tokens
            info["per_seed"].append({
                "seed": seed, "requests": len(trace), "working_set_blocks": working_set, "device_blocks": device,
                "host_blocks": host, "prompt_tokens": sum(e.prompt_tokens for e in trace),
                "unbounded_hit_tokens": unbounded,
                # Each distinct block is computed at least once: the least write-through can write.
                "distinct_blocks_per_request": working_set / len(trace),
                "unbounded_second_over_first": sum(twice[len(trace) :]) / unbounded if unbounded else 0.0,
            })  # fmt: skip
            for lower, replicas in LOWER_TIERS.items():
                configs: list[tuple[str, str, list[tuple[str, int | None]], str]] = [
                    ("none", NO_POLICY, [(HOST_TIER, host)], "write-back")
                ]
                for fraction in LOWER_FRACTIONS:
                    capacity = None if fraction is None else round(working_set * fraction)
                    size = "unbounded" if fraction is None else f"{fraction:g} of working set"
                    configs += [(size, p, [(HOST_TIER, host), (lower, capacity)], p) for p in STUDY_POLICIES]
                for size, policy_label, tiers, policy in configs:
                    restarted = second_pass(trace, block_size, device, tiers, policy, replicas=replicas)
                    kept = second_pass(trace, block_size, device, tiers, policy, restart=False, replicas=replicas)
                    figures = _figures(trace, unbounded, None if size == "none" else lower, restarted.second,
                                       restarted.first, kept.second)  # fmt: skip
                    per_seed.setdefault((lower, size, policy_label), []).append(figures)
        traces_info.append(info)
        for (lower, size, policy_label), runs in per_seed.items():
            summary = {}
            for figure in runs[0]:
                values = [r[figure] for r in runs]
                summary[figure] = {"mean": statistics.mean(values), "min": min(values), "per_seed": values}
            rows.append({
                "workload": label, "lower_tier": lower, "replicas": LOWER_TIERS[lower], "lower_capacity": size,
                "write_policy": policy_label, "seeds": list(seeds), "figures": summary,
            })  # fmt: skip
    return {"traces": traces_info, "rows": rows}


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table: shares of the unbounded cache's hits (mean, lowest seed in brackets), the
    persistent tier's writes per request, and the restart figures (means)."""
    head = ["workload", "below host", "write policy", "hits / unbounded", "device", "host", "disk or redis",
            "writes / request", "2nd pass / 1st, restart", "restart loss"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        f = r["figures"]
        below = "nothing" if r["lower_capacity"] == "none" else f"{r['lower_tier']}, {r['lower_capacity']}"
        if r["replicas"] > 1:
            below += f" ({r['replicas']} replicas)"
        cells = [
            r["workload"], below, r["write_policy"],
            f"{100 * f['share']['mean']:.1f}% ({100 * f['share']['min']:.0f}%)",
            *(f"{100 * f[k]['mean']:.1f}%" for k in ("device", "host", "lower")),
            f"{f['writes_per_request']['mean']:.1f}",
            f"{f['restart_second_over_first']['mean']:.2f}",
            f"{100 * f['restart_loss']['mean']:.1f}%",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m promptcache.bench.tier_study", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--seeds", default="0-2", help="workload seeds: a range 0-2 or a list 0,3,7")
    parser.add_argument("--quick", action="store_true", help="the workloads' quick sizes")
    labels = [label for label, _, _ in _cases(False)]
    names = ", ".join(label.replace(" ", "-") for label in labels)
    parser.add_argument("--workloads", default=None, help=f"only these, comma-separated, of: {names}")
    parser.add_argument("--out", default=None, help="also write every number to this JSON file")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    workloads = None
    if args.workloads:
        workloads = [w.strip().replace("-x", " x") for w in args.workloads.split(",")]
        unknown = sorted(set(workloads) - set(labels))
        if unknown:
            parser.error(f"unknown workloads {', '.join(unknown)}")
    t0 = time.perf_counter()
    data = study(_seeds(args.seeds), args.quick, workloads)
    print(markdown(data["rows"]))
    if args.out:
        command = ["python", "-m", "promptcache.bench.tier_study", *(sys.argv[1:] if argv is None else argv)]
        out = {"command": " ".join(command), "quick": args.quick, "device_fraction": DEVICE_FRACTION,
               "host_fraction": HOST_FRACTION, **data, "wall_s": time.perf_counter() - t0}  # fmt: skip
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
