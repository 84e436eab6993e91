"""The ``promptcache`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from promptcache.engine.request import RequestOutput


def _print_output(i: int, out: RequestOutput, stats: dict[str, int | float]) -> None:
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
    )
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    for i in range(args.repeat):
        if args.chat:
            out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
        else:
            out = llm.generate([args.prompt], params)[0]
        _print_output(i, out, llm.cache_stats())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptcache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt and print the cache figures")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="Hugging Face model folder (default: the embedded model)")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--repeat", type=int, default=2, help="run the prompt this many times (the repeats hit the cache)")
    gen.add_argument("--no-prefix-caching", action="store_true")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"promptcache: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
