"""The synchronous engine core: admit requests, step the scheduler and the model, finish and stream outputs."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field

import psutil
import torch

from promptcache.cache.events import DEVICE, KVEventSink
from promptcache.cache.eviction import DEFAULT_EVICTION_POLICY, EVICTION_POLICIES
from promptcache.cache.hashing import BlockHash
from promptcache.cache.manager import KVCacheManager
from promptcache.cache.tiers.base import KVLayout
from promptcache.cache.tiers.stack import TierOptions, TierStack, build_tier_stack
from promptcache.engine.request import Request, RequestOutput, SamplingParams
from promptcache.engine.runner import ATTENTION_MODES, ModelRunner
from promptcache.engine.sampler import Sampler
from promptcache.engine.scheduler import SCHEDULING_POLICIES, Scheduler
from promptcache.engine.structured import GrammarCache
from promptcache.model import kernels
from promptcache.model.loader import load_model, precision_fingerprint, weight_precision
from promptcache.model.quant import QUANTIZATIONS
from promptcache.model.source import EMBEDDED_MODEL, resolve_model
from promptcache.tokenizer import IncrementalDetokenizer

# The embedded 5M random-weight model (tests and offline tools use it; the default model is resolve_model(None)).
DEFAULT_MODEL = EMBEDDED_MODEL
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    """Everything that shapes an engine; ``LLM(...)`` keyword arguments land here."""

    model: str | None = None  # GGUF file, HF folder, hub id org/name[@rev]; None: the default (source.py)
    device: str = "auto"
    dtype: str = "auto"
    # Weights: "auto" keeps a GGUF's own quantized precision where a kernel exists (Q8_0 as int8, Q4_0/Q4_1/Q4_K
    # as int4) and dense models dense; "none" dequantizes everything; "int8" / "int4" quantize at load.
    quantization: str = "auto"
    # torch.compile the decode step (the fused one-row step, and the 2-16 row products; paid at start-up, on CPU);
    # PROMPTCACHE_COMPILE=0 changes the default (the test suite's many small engines would each pay seconds).
    compile: bool = field(default_factory=lambda: os.environ.get("PROMPTCACHE_COMPILE", "1") != "0")
    compile_buckets: tuple[int, ...] = kernels.DEFAULT_BUCKETS  # batch sizes of the fused step (<= max_num_seqs)
    attention: str = "paged"  # "paged": read the KV pool in place; "gather": copy each context out first (old)
    block_size: int = 16
    kv_cache_memory_gb: float | None = None
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_gb (tests use tiny pools)
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    scheduling_policy: str = "fcfs"
    eviction_policy: str = DEFAULT_EVICTION_POLICY  # which idle cached block goes first: "lfu" or "lru"
    seed: int | None = 0
    # Tiers below the device pool (cache/tiers/): host memory, a disk directory, a Redis shared by replicas.
    host_cache_gb: float | None = None
    disk_cache_dir: str | None = None
    disk_cache_gb: float = 10.0
    redis_url: str | None = None  # redis://host:port/db, rediss://..., unix://..., redis+cluster://host:port
    redis_ttl: float = 86400.0
    tier_read_timeout: float = 1.0  # seconds (+2 ms per block read); a later read is a miss (recomputed)
    tier_load_policy: str = "auto"  # "auto": load only when measured faster than recomputing; "always"

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}")
        if self.eviction_policy not in EVICTION_POLICIES:
            raise ValueError(f"eviction policy must be one of {EVICTION_POLICIES}, got {self.eviction_policy!r}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        self.tier_options()  # validates the tier fields

    def tier_options(self) -> TierOptions:
        return TierOptions(
            host_cache_gb=self.host_cache_gb,
            disk_cache_dir=self.disk_cache_dir,
            disk_cache_gb=self.disk_cache_gb,
            redis_url=self.redis_url,
            redis_ttl=self.redis_ttl,
            read_timeout=self.tier_read_timeout,
            load_policy=self.tier_load_policy,
        )

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        name = self.dtype
        if name == "auto":
            name = "bfloat16" if device.type == "cuda" else "float32"
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or 'auto', got {name!r}")
        return DTYPES[name]


class LLMEngine:
    """Owns the model, tokenizer, KV cache, scheduler and sampler; ``step()`` advances every running request."""

    def __init__(self, config: EngineConfig | None = None):
        self.config = cfg = config or EngineConfig()
        self.source = resolve_model(cfg.model)
        self.model_name = self.source.name
        self.device = cfg.resolved_device()
        self.dtype = cfg.resolved_dtype(self.device)
        self.model_config = self.source.config()
        self.tokenizer = self.source.tokenizer()
        self.max_model_len = min(
            cfg.max_model_len or self.model_config.max_position_embeddings, self.model_config.max_position_embeddings
        )
        self.model = load_model(self.source, self.dtype, self.device, self.max_model_len, cfg.quantization)
        self.precision = weight_precision(self.model)
        # NOTE: quantized weights give other K/V than dense ones: their blocks must never share an address.
        self.fingerprint = precision_fingerprint(self.source.fingerprint(), self.precision)
        self.source.release()
        self.compile_seconds: float | None = None
        # NOTE: CPU only for now: the CUDA path (inductor's Triton kernels, CUDA graphs) has not run on a GPU yet.
        if cfg.compile and self.device.type == "cpu":
            kernels.enable_quantized_kernels()
            buckets = tuple(b for b in cfg.compile_buckets if b <= cfg.max_num_seqs) or (1,)
            self.compile_seconds = self.model.enable_compile(buckets)
        compiled = self.model.compiled
        if compiled is None or compiled.failed is not None:
            self.model.use_eager_layout()
        num_blocks = cfg.num_kv_blocks or self._blocks_from_memory()
        self.kv = KVCacheManager(
            num_blocks,
            cfg.block_size,
            self.fingerprint,
            str(self.dtype),
            cfg.enable_prefix_caching,
            cfg.eviction_policy,
        )
        self.runner = ModelRunner(
            self.model, num_blocks, cfg.block_size, self.dtype, self.device, attention=cfg.attention
        )
        mc = self.model_config
        shape = (mc.num_layers, 2, cfg.block_size, mc.num_kv_heads, mc.head_dim)
        layout = KVLayout(self.fingerprint, self.dtype, shape, cfg.block_size)
        self.tiers: TierStack | None = build_tier_stack(cfg.tier_options(), layout, self.runner, self.device)
        if self.tiers is not None:
            self.kv.attach_tiers(self.tiers)
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.scheduling_policy)
        self.sampler = Sampler(self.device, cfg.seed)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(self.model_config.eos_token_ids)
        self.grammars = GrammarCache(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids))
        # The token a constrained request ends with once its grammar is complete (what the model is then forced to
        # sample, appended without a step): the named EOS, as a chat template closes a turn with it.
        named = self.tokenizer.eos_token_id
        self.grammar_eos = named if named in self.eos_token_ids else min(self.eos_token_ids, default=None)
        self.requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        self.num_steps = 0

    # ---- sizing ---------------------------------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        """2 x layers x kv_heads x head_dim x dtype bytes: the K and V of one token in every layer."""
        return self.model_config.kv_bytes_per_token * torch.tensor([], dtype=self.dtype).element_size()

    def _blocks_from_memory(self) -> int:
        per_block = self.kv_bytes_per_token * self.config.block_size
        budget_gb = self.config.kv_cache_memory_gb
        if budget_gb is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.85)
            else:  # a quarter of available RAM, at most 4 GiB: the rest belongs to the process and its neighbours
                budget = min(4 << 30, psutil.virtual_memory().available // 4)
        else:
            budget = int(budget_gb * (1 << 30))
        blocks = budget // per_block
        if blocks < 1:
            raise ValueError(f"kv_cache_memory_gb={budget_gb} holds no block of {per_block} bytes")
        return int(blocks)

    # ---- requests -------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for any request the engine cannot serve as asked; changes nothing."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if not all(type(t) is int for t in prompt_ids):
            raise ValueError("prompt token ids must be integers")
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            bad = [t for t in prompt_ids if not 0 <= t < vocab]
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary (size {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_model_len}, "
                "and at least one token must be generated"
            )
        params.validate(vocab)
        total = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        if self.kv.blocks_for(total) > self.kv.pool.num_blocks:
            raise ValueError(
                f"prompt plus max_tokens needs {self.kv.blocks_for(total)} KV blocks; the cache has "
                f"{self.kv.pool.num_blocks}"
            )

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        namespace: str = "default",
        request_id: str | None = None,
        cache_breakpoints: list[tuple[int, float]] | None = None,
        retention_seconds: float = 0.0,
    ) -> Request:
        """Validate and queue one request; raises ValueError (and queues nothing) on bad input.

        ``cache_breakpoints`` (prompt tokens, TTL seconds) pin those leading blocks in the device pool and the
        lower tiers; ``retention_seconds`` keeps the whole prompt in the lower tiers that long (OpenAI's 24h).
        A ``structured_output`` is compiled here unless already cached (``grammars.compile`` ahead of time, off
        this thread, avoids the wait); an invalid one raises ValueError.
        """
        params = params or SamplingParams()
        prompt_ids = self.encode_prompt(prompt)
        self.validate(prompt_ids, params)
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        spec = params.structured_output
        matcher = None if spec is None else self.grammars.matcher(spec, namespace)
        req = Request(
            request_id=rid,
            prompt_token_ids=prompt_ids,
            params=params,
            namespace=namespace,
            seq=self.kv.new_seq(namespace),
            prompt=prompt if isinstance(prompt, str) else None,
            eos_token_ids=frozenset() if params.ignore_eos else self.eos_token_ids,
            cache_breakpoints=sorted(cache_breakpoints or []),
            block_size=self.kv.block_size,
            retention_seconds=retention_seconds,
            matcher=matcher,
        )
        self.requests[rid] = req
        self._detok[rid] = IncrementalDetokenizer(self.tokenizer)
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False if it is unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        self._finish(req, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping -------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns an output for every request that got a token or finished."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self.num_steps += 1
        now = time.perf_counter()
        for req, _ in batch.work:
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
        logits, sampled = self.runner.execute(batch.work)
        if self.tiers is not None and batch.num_tokens >= 4 * self.kv.block_size:
            # What a recomputed token costs here, against which loading a run from a lower tier is weighed.
            self.tiers.recompute_rate.observe(time.perf_counter() - now, batch.num_tokens)
        prompt_blocks_of = self.kv.block_size
        for req, n in batch.work:
            req.num_computed += n
            written = self.kv.commit(req.seq, req.token_ids, req.num_computed)
            req.written_blocks.extend(i for i in written if i < req.num_prompt_tokens // prompt_blocks_of)
        if logits is None:
            return []
        tokens, logprobs = self.sampler.sample(
            logits, [r.request_id for r in sampled], [r.params for r in sampled], [r.matcher for r in sampled]
        )
        now = time.perf_counter()
        for req in sampled:
            if (req.cache_breakpoints or req.retention_seconds) and req.metrics.first_token_time is None:
                self._pin_breakpoints(req)
        return [self._append(req, tok, lp, now) for req, tok, lp in zip(sampled, tokens, logprobs)]

    def _append(self, req: Request, token: int, logprob: dict | None, now: float) -> RequestOutput:
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.token_ids.append(token)
        if logprob is not None and req.logprobs is not None:
            for tok, entry in logprob.items():
                entry.decoded_token = self.tokenizer.decode([tok], skip_special_tokens=False)
            req.logprobs.append(logprob)
        params = req.params
        prev_len = len(req.text)
        streamed = req.num_streamed_chars
        new_tokens = [token]
        if token in req.eos_token_ids or token in params.stop_token_ids:
            self._finish(req, "stop", stop_reason=token)
        else:
            complete = req.matcher is not None and self._grammar_complete(req, token)
            req.text += self._detok[req.request_id].push(token)
            stopped = bool(params.stop) and self._check_stop_strings(req, prev_len)
            if not stopped and complete:  # nothing else may follow: end as the model would, with its EOS
                if self.grammar_eos is not None:
                    req.token_ids.append(self.grammar_eos)
                    new_tokens.append(self.grammar_eos)
                self._finish(req, "stop", stop_reason=self.grammar_eos)
            elif not stopped and (
                req.num_output_tokens >= params.max_tokens or len(req.token_ids) >= self.max_model_len
            ):
                self._finish(req, "length")
        # NOTE: while a stop string could still complete, hold back its length - 1 characters: text once
        # streamed is never taken back, so streamed pieces always add up to the final text.
        hold = 0 if req.finished or not params.stop else max(len(s) for s in params.stop) - 1
        req.num_streamed_chars = max(streamed, len(req.text) - hold)
        return self._output(req, new_tokens=new_tokens, new_text=req.text[streamed : req.num_streamed_chars])

    @staticmethod
    def _grammar_complete(req: Request, token: int) -> bool:
        """Advance a constrained request's grammar by ``token``; True once nothing can follow (or, never expected
        since the sampler masks, the grammar refused the token)."""
        return not req.matcher.consume_token(token) or req.matcher.is_stopped()

    def _pin_breakpoints(self, req: Request) -> None:
        """Pin the blocks up to each cache breakpoint for its TTL (a hit refreshes the pin: same call)."""
        now, wall = self.kv.pool.now(), time.time()
        bs = self.kv.block_size
        for num_tokens, ttl in req.cache_breakpoints:
            self.kv.pool.pin(req.seq.blocks[: num_tokens // bs], now + ttl)
            # Pins outlive device eviction: the lower tiers keep these blocks for the TTL too.
            self.kv.pin_in_tiers(req.seq, num_tokens // bs, wall + ttl)
        if req.retention_seconds:
            self.kv.pin_in_tiers(req.seq, req.num_prompt_tokens // bs, wall + req.retention_seconds)

    def explain(self, prompt: str | list[int], namespace: str = "default") -> dict[str, object]:
        """Where a prompt would hit the cache and why it would miss where it does, with the text around the miss."""
        ids = self.encode_prompt(prompt)
        info = self.kv.explain(namespace, ids)
        at = int(info["first_miss_token"])  # type: ignore[call-overload]
        if at < len(ids):
            info["text_before_miss"] = self.tokenizer.decode(ids[max(0, at - 24) : at], skip_special_tokens=False)
            info["text_at_miss"] = self.tokenizer.decode(ids[at : at + 24], skip_special_tokens=False)
        return info

    def _check_stop_strings(self, req: Request, prev_len: int) -> bool:
        """Finish at the first stop string that the new text completes; the text is cut before it."""
        stops = req.params.stop or []
        longest = max(len(s) for s in stops)
        window_start = max(0, prev_len - longest + 1)
        best: tuple[int, str] | None = None
        for s in stops:
            at = req.text.find(s, window_start)
            if at != -1 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return False
        at, s = best
        req.text = req.text[: at + len(s)] if req.params.include_stop_str_in_output else req.text[:at]
        self._finish(req, "stop", stop_reason=s)
        return True

    def _finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        if reason != "stop" or isinstance(stop_reason, int):
            req.text += self._detok[req.request_id].finish()
        req.finish_reason, req.stop_reason = reason, stop_reason
        req.metrics.finished_time = time.perf_counter()
        self.scheduler.finish(req)
        self.sampler.forget(req.request_id)
        self._detok.pop(req.request_id, None)

    def _output(self, req: Request, new_tokens: list[int], new_text: str) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=req.output_token_ids,
            text=req.text,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            num_cached_tokens=req.num_cached_tokens or 0,
            cached_tokens_by_tier=dict(req.cached_tokens_by_tier),
            metrics=req.metrics,
            logprobs=req.logprobs,
            finished=req.finished,
            num_cache_write_tokens=req.num_cache_write_tokens,
            written_blocks=list(req.written_blocks),
            new_token_ids=new_tokens,
            new_text=new_text,
        )

    def output_of(self, request_id: str) -> RequestOutput:
        req = self.requests[request_id]
        return self._output(req, [], "")

    def release(self, request_id: str) -> None:
        """Forget a finished request's record (the engine keeps them until the caller has read them)."""
        req = self.requests.get(request_id)
        if req is not None and req.finished:
            del self.requests[request_id]

    # ---- introspection --------------------------------------------------------------------------------------
    def cache_stats(self) -> dict[str, int | float | str]:
        pool = self.kv.pool
        return {
            "block_size": self.kv.block_size,
            "num_blocks": pool.num_blocks,
            "blocks_free": pool.num_free,
            "blocks_cached": pool.num_cached,
            "blocks_in_use": pool.num_in_use,
            "blocks_pinned": pool.num_pinned,
            "registered_blocks": pool.num_registered,
            "evictions": pool.num_evictions,
            "eviction_policy": pool.eviction_policy,
            "query_tokens": self.kv.query_tokens,
            "hit_tokens": self.kv.hit_tokens,
            "hit_rate": self.kv.hit_tokens / self.kv.query_tokens if self.kv.query_tokens else 0.0,
            "preemptions": self.scheduler.num_preemptions,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_cache_bytes": self.runner.kv_cache_bytes,
            "hit_tokens_by_tier": dict(self.kv.hit_tokens_by_tier),
        }

    def execution_info(self) -> dict[str, object]:
        """How this engine computes: dtype, weight precision, attention, and the compiled decode step's buckets and
        start-up cost (None when compilation is off; ``compile_failed`` says why it fell back to eager)."""
        compiled = self.model.compiled
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "weights": self.precision,
            "attention": self.config.attention,
            "compiled_buckets": None if compiled is None or compiled.failed else list(compiled.buckets),
            "compile_seconds": self.compile_seconds,
            "compile_failed": None if compiled is None else compiled.failed,
        }

    def tier_stats(self) -> dict[str, object] | None:
        """Every lower tier's counters, sizes and latency histograms (None: no tiers). Safe from any thread (a
        Redis key count is a SCAN: callers keep it off the engine thread)."""
        return None if self.tiers is None else self.tiers.stats()

    def check_integrity(self, deep: bool = False) -> dict[str, list[str]]:
        """Problems found in the device pool and each tier (empty lists: all consistent)."""
        problems: dict[str, list[str]] = {"device": []}
        try:
            self.kv.pool.check_integrity()
        except AssertionError as err:
            problems["device"].append(str(err) or "device pool invariant broken")
        if self.tiers is not None:
            problems.update(self.tiers.check_integrity(deep))
        return problems

    def reset_cache(self, tiers: bool = False, shared: bool = False) -> dict[str, int]:
        """Forget cached blocks: the device pool's idle ones, and with ``tiers`` every local tier's entries (and
        with ``shared`` also this model's entries in shared tiers, which other replicas read)."""
        out = {"device": self.kv.pool.reset()}
        if tiers and self.tiers is not None:
            out.update(self.tiers.clear(shared))
        return out

    # ---- KV events (the fleet) -----------------------------------------------------------------------------
    def attach_kv_events(self, sink: KVEventSink) -> None:
        """Tell ``sink`` every address the device pool and each local tier start or stop holding from now on."""
        self.kv.pool.events = sink
        for tier in self.tiers.tiers if self.tiers is not None else []:
            if not tier.shared:
                tier.events = sink

    def kv_addresses(self) -> dict[str, list[BlockHash]]:
        """What the device pool and each local tier hold now, by tier (call on the engine thread: a KV-event
        snapshot must see the pool between steps)."""
        out = {DEVICE: self.kv.pool.addresses()}
        for tier in self.tiers.tiers if self.tiers is not None else []:
            held = tier.addresses()
            if held is not None:
                out[tier.name] = held
        return out

    def close(self) -> None:
        """Finish pending tier writes and release the tiers (the engine is not used afterwards)."""
        if self.tiers is not None:
            self.tiers.close()
