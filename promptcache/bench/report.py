"""The workload benchmark's report: results.json (every raw number), summary.md (the tables) and PNG plots.

    write_report(results, out_dir) -> {"json": ..., "summary": ..., "ttft_by_turn": ..., ...}

``results`` is what ``promptcache.bench.runner.run_bench`` returns. Plots (matplotlib, Agg backend):
- ``ttft_by_turn.png``: chat, TTFT by turn with and without the cache (and transformers), beside the prompt tokens
  per turn and how many of them came from the cache;
- ``hit_ratio_vs_belady.png``: hit ratio against KV capacity for Belady's optimum, LFU and LRU replayed offline, and the
  engine's measured point (pressure first, then the other workloads);
- ``cost_by_component.png``: USD per 1,000 requests, stacked by input / cached input / output, caching off vs on,
  per workload, under one provider-shaped preset and under the measured-compute table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

JSON_NAME, SUMMARY_NAME = "results.json", "summary.md"
TTFT_PLOT, BELADY_PLOT, COST_PLOT = "ttft_by_turn.png", "hit_ratio_vs_belady.png", "cost_by_component.png"
TARGET_LABELS = {
    "engine-cache-on": "promptcache, cache on",
    "engine-cache-off": "promptcache, cache off",
    "transformers": "transformers (no reuse)",
    "endpoint": "endpoint",
}
TARGET_STYLE = {
    "engine-cache-on": {"color": "tab:green", "marker": "o"},
    "engine-cache-off": {"color": "tab:red", "marker": "s"},
    "transformers": {"color": "tab:gray", "marker": "^"},
    "endpoint": {"color": "tab:blue", "marker": "D"},
}
COMPONENTS = (("input", "uncached input", "tab:orange"), ("cached_input", "cached input", "tab:green"),
              ("output", "output", "tab:purple"))  # fmt: skip


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, summary.md and every plot the results allow into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / JSON_NAME
    # The raw numbers first: whatever goes wrong in drawing, they are kept (and the report can be redrawn from them).
    json_path.write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    plots = write_plots(results, out)
    results["plots"] = {name: path.name for name, path in plots.items()}
    json_path.write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    summary_path = out / SUMMARY_NAME
    summary_path.write_text(summary_markdown(results))
    return {"json": json_path, "summary": summary_path, **plots}


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


# ---- formatting ---------------------------------------------------------------------------------------------
def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.1f}"


def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _num(value: float | None, fmt: str = "{:,.1f}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.6f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


# ---- summary.md ---------------------------------------------------------------------------------------------
def summary_markdown(results: dict[str, Any]) -> str:
    """The report as Markdown: headline, generated-token agreement, latency and throughput, chat turns, Belady,
    cost, calibration, notes."""
    wls: dict[str, Any] = results["workloads"]
    m, v = results["machine"], results["versions"]
    lines = [
        f"# promptcache bench, {results['date']}",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"Machine: {m['processor']}, {m['cpus_usable']} usable of {m['cpu_count']} CPUs, {m['memory_gib']} GiB, "
        f"{'GPU ' + m['cuda'] if m.get('cuda') else 'no GPU'}; {m['platform']}. Python {v['python']}, torch "
        f"{v['torch']}, transformers {v['transformers']}, promptcache {v['promptcache']}"
        + (f" ({v['git_commit']})" if v.get("git_commit") else "")
        + f". Model: {results['model']} ({results['engine']['dtype']}, {results['engine']['device']}), "
        f"block size {results['engine']['block_size']}; seed {results['seed']}"
        + ("; --quick sizes" if results["quick"] else "")
        + f"; the whole run took {results.get('wall_s', 0):.0f} s.",
        "",
        "Requests run one at a time in each workload's arrival order (sessions interleaved, each turn resending the "
        "whole history, greedy, fixed output lengths), so TTFT never includes queueing. The caching-on and "
        "caching-off engines take turns request by request.",
        "",
    ]
    lines += _headline(results)
    lines += _agreement(results)
    lines += _latency(results)
    if any(w.get("previous_turn_share") for w in wls.values()):
        lines += _turns(results)
    if any(w.get("belady") for w in wls.values()):
        lines += _belady(results)
    lines += _cost(results)
    if results.get("calibration"):
        lines += _calibration(results["calibration"])
    lines += _workload_sizes(results)
    plots = results.get("plots", {})
    if plots:
        lines += ["## Plots", ""]
        for name in (TTFT_PLOT, BELADY_PLOT, COST_PLOT):
            if name in plots.values():
                lines += [f"![{name[:-4]}]({name})", ""]
    if results.get("notes"):
        lines += ["## Skipped", "", *(f"- {n}" for n in results["notes"]), ""]
    return "\n".join(lines)


def _headline(results: dict[str, Any]) -> list[str]:
    wls = results["workloads"]
    has_measured = "measured" in results["pricing"]
    header = ["workload", "TTFT p50 cache off / on", "prompt tokens from cache", "of Belady's bound",
              "saving, default preset"]  # fmt: skip
    if has_measured:
        header.append("saving, measured compute")
    rows = []
    for name, w in wls.items():
        runs = w["runs"]
        primary = runs.get("engine-cache-on") or runs.get("endpoint")
        bel = w.get("belady")
        row = [
            name,
            _x(w.get("ttft_p50_off_over_on"), 1),
            _pct(primary["figures"]["cached_share"]),
            _pct(bel["measured_over_belady"]) if bel else "-",
            _pct((w["cost"]["default"]["saving_pct"] or 0) / 100),
        ]
        if has_measured:
            row.append(_pct((w["cost"]["measured"]["saving_pct"] or 0) / 100))
        rows.append(row)
    return ["## Headline", "", *_table(header, rows), ""]


def _label(target: str) -> str:
    return TARGET_LABELS.get(target, target)


def _agreement(results: dict[str, Any]) -> list[str]:
    """One line when every pair of targets generated the same token ids on every request; else one per pair that
    did not, with where its first divergence is."""
    pairs = [(name, p) for name, w in results["workloads"].items() for p in w.get("output_agreement", [])]
    if not pairs:
        return []
    diverging = [(name, p) for name, p in pairs if p["requests_diverging"]]
    compared = sum(p["requests_compared"] for _, p in pairs)
    if not diverging:
        targets = dict.fromkeys(t for _, p in pairs for t in (p["a"], p["b"]))
        return [
            f"Generated token ids: {' = '.join(_label(t) for t in targets)}, on every request ({compared:,} request "
            "pairs compared, none diverging).",
            "",
        ]
    lines = [f"**Generated token ids diverge** ({sum(p['requests_diverging'] for _, p in diverging):,} of "
             f"{compared:,} request pairs compared):", ""]  # fmt: skip
    for name, p in diverging:
        f = p["first_divergence"]
        prompt = "same prompt ids" if f["same_prompt"] else "the prompts already differed"
        lines.append(
            f"- {name}: {_label(p['a'])} vs {_label(p['b'])}: {p['requests_diverging']} of {p['requests_compared']} "
            f"requests; the first at request {f['request']} ({f['session_id']}, turn {f['turn']}), token {f['token']} "
            f"({prompt})"
        )
    return [*lines, ""]


def _latency(results: dict[str, Any]) -> list[str]:
    header = ["workload", "target", "requests", "TTFT p50 ms", "p90 ms", "p99 ms", "TPOT p50 ms", "req/s",
              "output tok/s", "prompt tok/s", "prompt tokens", "from cache"]  # fmt: skip
    rows = []
    for name, w in results["workloads"].items():
        for target, run in w["runs"].items():
            f = run["figures"]
            cached = "-" if f["cached_tokens"] is None else f"{f['cached_tokens']:,} ({_pct(f['cached_share'])})"
            rows.append([
                name, TARGET_LABELS.get(target, target), str(f["requests"]), _ms(f["ttft_p50_s"]),
                _ms(f["ttft_p90_s"]), _ms(f["ttft_p99_s"]), _ms(f["tpot_p50_s"]), _num(f["requests_per_s"], "{:.2f}"),
                _num(f["output_tokens_per_s"], "{:,.0f}"), _num(f["prompt_tokens_per_s"], "{:,.0f}"),
                f"{f['prompt_tokens']:,}", cached,
            ])  # fmt: skip
    lines = ["## Latency and throughput", "", *_table(header, rows), ""]
    ratios = []
    for name, w in results["workloads"].items():
        if w.get("ttft_p50_off_over_on") is not None:
            extra = w.get("ttft_p50_transformers_over_on")
            ratios.append([name, _x(w["ttft_p50_off_over_on"]), _x(extra)])
    if ratios:
        lines += ["TTFT p50 ratios (higher: the cache helps more):", ""]
        lines += _table(["workload", "cache off / cache on", "transformers / cache on"], ratios) + [""]
    return lines


def _turns(results: dict[str, Any]) -> list[str]:
    lines = [
        "## Multi-turn: the previous turn served from cache",
        "",
        "Share of the previous turn (its prompt and the model's answer) served from the cache on each later turn. "
        "A block-granular cache cannot serve the partial last block, nor the answer's last token (its KV is never "
        "computed); the ceiling column is that limit.",
        "",
    ]
    rows = []
    for name, w in results["workloads"].items():
        for target, s in w.get("previous_turn_share", {}).items():
            rows.append([name, TARGET_LABELS.get(target, target), str(s["turns"]), _pct(s["mean"]), _pct(s["min"]),
                         _pct(s["achievable_mean"])])  # fmt: skip
    lines += _table(["workload", "target", "later turns", "mean", "min", "ceiling (mean)"], rows) + [""]
    chat = results["workloads"].get("chat")
    if chat:
        per_target = {
            t: {e["turn"]: e["mean_s"] for e in r["figures"]["ttft_by_turn"]} for t, r in chat["runs"].items()
        }
        turns = sorted({t for d in per_target.values() for t in d})
        header = ["turn", *(TARGET_LABELS.get(t, t) + " ms" for t in per_target)]
        rows = [[str(t), *(_ms(d.get(t)) for d in per_target.values())] for t in turns]
        lines += ["chat: mean TTFT by turn", "", *_table(header, rows), ""]
    return lines


def _belady(results: dict[str, Any]) -> list[str]:
    lines = [
        "## Hit ratio against Belady's optimum",
        "",
        "The caching-on run's block trace (every request's full prompt blocks usable for a hit, and every block it "
        "computed or reused) replayed offline at the engine's capacity with Belady's optimal eviction and with each "
        "of the engine's policies (LFU, aged, the default; LRU). " + results["capacity_note"],
        "",
    ]
    rows = []
    for name, w in results["workloads"].items():
        b = w.get("belady")
        if not b:
            continue
        rows.append([
            name, b.get("engine_policy", "lru"), f"{b['capacity_blocks']:,}", f"{b['working_set_blocks']:,}",
            _pct(b["measured_hit_ratio"]), _pct(b.get("lfu_sim_hit_ratio")), _pct(b["lru_sim_hit_ratio"]),
            _pct(b["belady_hit_ratio"]), _pct(b["measured_over_belady"]), _pct(b.get("lfu_sim_over_belady")),
            _pct(b["lru_sim_over_belady"]),
        ])  # fmt: skip
    header = ["workload", "policy", "capacity (blocks)", "working set (blocks)", "ours (measured)", "LFU (sim)",
              "LRU (sim)", "Belady", "ours / Belady", "LFU / Belady", "LRU / Belady"]  # fmt: skip
    lines += _table(header, rows) + [""]
    pressure = results["workloads"].get("pressure", {}).get("belady")
    if pressure:
        target = pressure["measured_over_belady"]
        verdict = "meets" if target is not None and target >= 0.9 else "misses"
        lines += [f"Under `pressure` our hit ratio is {_pct(target)} of Belady's bound ({verdict} the 90% target).", ""]
        steady = pressure.get("steady_state")
        if steady:
            lines += [
                f"Over the second half of its requests ({steady['requests']}), once the cache has seen some of the "
                f"workload, it is {_pct(steady['measured_over_belady'])} of Belady's hits over the same requests "
                f"(LFU simulated: {_pct(steady.get('lfu_sim_over_belady'))}, LRU simulated: "
                f"{_pct(steady.get('lru_sim_over_belady'))}).",
                "",
            ]
        rows = [[f"{s['capacity_blocks']:,}", _x(s["fraction_of_working_set"]), _pct(s.get("lfu")), _pct(s["lru"]),
                 _pct(s["belady"]), _pct(s["lfu"] / s["belady"] if s.get("lfu") is not None and s["belady"] else None),
                 _pct(s["lru"] / s["belady"] if s["belady"] else None)] for s in pressure["sweep"]]  # fmt: skip
        lines += ["pressure: capacity sweep (offline)", ""]
        header = ["capacity (blocks)", "of working set", "LFU", "LRU", "Belady", "LFU / Belady", "LRU / Belady"]
        lines += _table(header, rows) + [""]
    return lines


def _cost(results: dict[str, Any]) -> list[str]:
    lines = ["## Cost", ""]
    names = list(results["pricing"])
    lines += [
        "USD for each run's tokens (no cache writes: the benchmark sets no breakpoints). Presets are shaped like the "
        "providers' price lists; `measured` is proportional to the compute this machine spends per token kind "
        "(uncached input priced at $1 per million). Prices per million tokens:",
        "",
    ]
    rows = [[n, *(f"{results['pricing'][n][k]:.4g}" for k in ("input", "cached_input", "output"))] for n in names]
    lines += _table(["table", "input", "cached input", "output"], rows) + [""]
    rows = []
    for wname, w in results["workloads"].items():
        for n in names:
            c = w["cost"][n]
            rows.append([wname, n, _usd(c["off"]["total"]), _usd(c["on"]["total"]), _usd(c["saving_usd"]),
                         _pct((c["saving_pct"] or 0) / 100)])  # fmt: skip
    lines += _table(["workload", "prices", "caching off", "caching on", "saving", "saving %"], rows) + [""]
    bases = {w["cost_basis"] for w in results["workloads"].values()}
    lines += [f"Basis: {'; '.join(sorted(bases))}.", ""]
    return lines


def _calibration(cal: dict[str, Any]) -> list[str]:
    if "ratios" not in cal:  # prices read from a pricing file (--compute-pricing): no measurement in this run
        return ["## Compute cost per token", "", f"The `measured` price table comes from {cal['source']}.", ""]
    ratios = cal["ratios"]
    lines = [
        "## Compute cost per token on this machine",
        "",
        f"From {cal['source']}: seconds of compute per token of each kind, and the ratios beside what providers "
        "charge. The `measured` price table above is proportional to these (output at batch 32).",
        "",
    ]
    rows = [
        ["uncached prompt token (prefill)", f"{cal['prefill_s_per_token'] * 1e6:,.2f} us", "1x", "1x"],
        ["cached prompt token (hit path)", f"{cal['cached_s_per_token'] * 1e6:,.3f} us",
         _x(ratios["cached_over_uncached"], 4), "0.1x"],
    ]  # fmt: skip
    for batch, s in cal["output_s_per_token"].items():
        rows.append(
            [f"output token, batch {batch}", f"{s * 1e6:,.2f} us", _x(ratios["output_over_input"][batch]), "4-5x"]
        )
    lines += _table(["token", "compute per token", "measured ratio to input", "providers charge"], rows) + [""]
    if cal.get("tldr_table"):
        lines += ["The seed's TL;DR table with the measured ratios:", "", cal["tldr_table"].strip(), ""]
    return lines


def _workload_sizes(results: dict[str, Any]) -> list[str]:
    rows = []
    for name, w in results["workloads"].items():
        s = w["sizes"]
        cap = w["runs"].get("engine-cache-on", {}).get("info", {})
        rows.append([name, w["description"], str(s["sessions"]), str(s["requests"]),
                     "ample" if s["cache_tokens"] is None else f"{s['cache_tokens']:,}",
                     f"{cap['num_kv_blocks']:,} ({cap['evictions']:,} evictions)" if cap else "-",
                     f"{w['wall_s']:.1f}"])  # fmt: skip
    header = ["workload", "what", "sessions", "requests", "cache tokens", "engine KV blocks", "wall s"]
    return ["## Workloads", "", *_table(header, rows), ""]


# ---- plots --------------------------------------------------------------------------------------------------
def write_plots(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Draw every plot the results have data for; returns {plot name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    paths: dict[str, Path] = {}
    for key, name, draw in (
        ("ttft_by_turn", TTFT_PLOT, plot_ttft_by_turn),
        ("hit_ratio_vs_belady", BELADY_PLOT, plot_hit_ratio_vs_belady),
        ("cost_by_component", COST_PLOT, plot_cost_by_component),
    ):
        if draw(results, out / name):
            paths[key] = out / name
        else:
            results.setdefault("notes", []).append(f"{name}: no data for it in this run")
    return paths


def _turn_workload(results: dict[str, Any]) -> str | None:
    wls = results["workloads"]
    if "chat" in wls:
        return "chat"
    multi = [n for n, w in wls.items() if w["sizes"]["max_steps_per_session"] > 1]
    return multi[0] if multi else None


def plot_ttft_by_turn(results: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    name = _turn_workload(results)
    if name is None:
        return False
    w = results["workloads"][name]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for target, run in w["runs"].items():
        by_turn = run["figures"]["ttft_by_turn"]
        style = TARGET_STYLE.get(target, {})
        ax.plot([e["turn"] for e in by_turn], [e["mean_s"] * 1000 for e in by_turn], label=TARGET_LABELS.get(target),
                linewidth=2, **style)  # fmt: skip
        recs = run["records"]
        ax.scatter([r["turn"] for r in recs], [r["ttft_s"] * 1000 for r in recs], s=10, alpha=0.25,
                   color=style.get("color"))  # fmt: skip
    ax.set_title(
        f"{name}: time to first token by turn\n(lines: mean over {w['sizes']['sessions']} sessions; dots: requests)"
    )
    ax.set_xlabel("turn of the conversation")
    ax.set_ylabel("TTFT (ms)")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    primary = w["runs"].get("engine-cache-on") or next(iter(w["runs"].values()))
    turns: dict[int, list[dict[str, Any]]] = {}
    for r in primary["records"]:
        turns.setdefault(r["turn"], []).append(r)
    xs = sorted(turns)
    prompt = [sum(r["prompt_tokens"] for r in turns[t]) / len(turns[t]) for t in xs]
    cached = [sum(r["cached_tokens"] or 0 for r in turns[t]) / len(turns[t]) for t in xs]
    ax2.bar(xs, prompt, color="tab:orange", label="prompt tokens, computed")
    ax2.bar(xs, cached, color="tab:green", label="prompt tokens, served from cache")
    ax2.set_title(f"{name}: prompt tokens per request by turn ({TARGET_LABELS.get(primary_target(w))}, mean)")
    ax2.set_xlabel("turn of the conversation")
    ax2.set_ylabel("tokens per request")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.grid(alpha=0.3, axis="y")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def primary_target(workload: dict[str, Any]) -> str:
    """The run whose tokens and hits the report prices and plots: the caching-on engine, else the endpoint."""
    return "engine-cache-on" if "engine-cache-on" in workload["runs"] else next(iter(workload["runs"]))


def plot_hit_ratio_vs_belady(results: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    names = [n for n, w in results["workloads"].items() if w.get("belady")]
    if not names:
        return False
    names.sort(key=lambda n: n != "pressure")  # pressure, the workload that evicts, first
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.3 * rows), squeeze=False)
    bs = results["engine"]["block_size"]
    for ax, name in zip(axes.flat, names):
        b = results["workloads"][name]["belady"]
        ws = b["working_set_blocks"] or 1
        xs = [s["capacity_blocks"] / ws for s in b["sweep"]]
        ax.plot(xs, [s["belady"] for s in b["sweep"]], "-o", color="tab:blue", label="Belady (optimal, offline)")
        if all("lfu" in s for s in b["sweep"]):
            ax.plot(xs, [s["lfu"] for s in b["sweep"]], "-^", color="tab:purple", label="LFU, aged (offline)")
        ax.plot(xs, [s["lru"] for s in b["sweep"]], "--s", color="tab:orange", label="LRU (offline)")
        ax.plot([b["capacity_blocks"] / ws], [b["measured_hit_ratio"]], "*", color="tab:green", markersize=16,
                label=f"promptcache ({b.get('engine_policy', 'lru').upper()}), measured "
                      f"({_pct(b['measured_over_belady'], 0)} of Belady)")  # fmt: skip
        ax.axvline(1.0, color="gray", linestyle=":", label=f"working set ({ws:,} blocks)")
        # Capacities span 0.25x to many times the working set: a log scale keeps every point apart.
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.set_title(name + (" (cache smaller than the working set)" if name == "pressure" else ""))
        ax.set_xlabel(f"KV capacity / working set (blocks of {bs} tokens)")
        ax.set_ylabel("prompt tokens served from cache")
        ax.set_ylim(0, 1.02)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.0%}"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("Hit ratio against Belady's optimal eviction, by cache capacity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_cost_by_component(results: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    wls = results["workloads"]
    if not wls:
        return False
    tables = [t for t in ("default", "measured") if t in results["pricing"]]
    fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 5), squeeze=False)
    names = list(wls)
    width = 0.38
    for ax, table in zip(axes.flat, tables):
        for j, (side, offset, hatch) in enumerate((("off", -width / 2, "//"), ("on", width / 2, ""))):
            bottom = [0.0] * len(names)
            for key, label, color in COMPONENTS:
                per_k = [wls[n]["cost"][table][side][key] * 1000 / max(1, wls[n]["sizes"]["requests"]) for n in names]
                ax.bar([i + offset for i in range(len(names))], per_k, width, bottom=bottom, color=color,
                       hatch=hatch, edgecolor="white", label=label if j == 1 else None)  # fmt: skip
                bottom = [a + b for a, b in zip(bottom, per_k)]
            for i, top in enumerate(bottom):
                ax.annotate(side, (i + offset, top), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("USD per 1,000 requests")
        prices = results["pricing"][table]
        ax.set_title(f"prices: {table} (per M tokens: input ${prices['input']:.3g}, cached "
                     f"${prices['cached_input']:.3g}, output ${prices['output']:.3g})", fontsize=10)  # fmt: skip
        ax.grid(alpha=0.3, axis="y")
        ax.legend(title="hatched: caching off", fontsize=8, title_fontsize=8)
    fig.suptitle("Cost by component, caching off (left bar) vs on (right bar)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Redraw a report from its results.json: ``python -m promptcache.bench.report RESULTS_JSON [--out DIR]``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", help="a results.json written by promptcache bench")
    parser.add_argument("--out", default=None, help="folder for the report (default: the results' folder)")
    args = parser.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    results["notes"] = [n for n in results.get("notes", []) if "no data for it" not in n]
    paths = write_report(results, args.out or Path(args.results).parent)
    print("\n".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
