"""Shared fixtures: small random Hugging Face models of every supported family, written by transformers itself."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from redis_servers import own_redis, redis_cluster, redis_server, redis_url  # noqa: F401 - fixtures

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "promptcache" / "data" / "default_model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Tests run on the small embedded model unless they name another (the real default, SmolLM2, is 30x larger and
# is used only by tests about real weights); PROMPTCACHE_MODEL is the default for `--model` / `LLM(model=None)`.
os.environ["PROMPTCACHE_MODEL"] = str(DEFAULT_MODEL)
# Engines (and the servers tests start) decode eagerly unless a test asks for compilation: hundreds of small
# engines would each pay seconds of torch.compile at start-up. tests/test_compiled_step.py covers compilation.
os.environ["PROMPTCACHE_COMPILE"] = "0"

# family -> (transformers config class name, extra config fields)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "llama3": (
        "LlamaConfig",
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        },
    ),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
}


def make_model(
    out: Path,
    family: str = "llama",
    *,
    tie: bool = False,
    shard: bool = False,
    seed: int = 0,
    **overrides,
) -> Path:
    """Write a small random model of ``family`` in HF format (with the default model's tokenizer) into ``out``."""
    import transformers

    cls_name, extra = FAMILIES[family]
    fields = dict(
        vocab_size=8192,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        initializer_range=0.05,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    fields.update(extra)
    fields.update(overrides)
    config = getattr(transformers, cls_name)(**fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="200KB" if shard else "2GB")
    for name in TOKENIZER_FILES:
        shutil.copy(DEFAULT_MODEL / name, out / name)
    gen = out / "generation_config.json"
    if gen.exists():
        raw = json.loads(gen.read_text())
        raw.pop("eos_token_id", None)
        gen.write_text(json.dumps(raw))
    return out


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build (once per set of arguments) a random model folder."""
    made: dict[str, Path] = {}

    def build(family: str = "llama", **kwargs) -> Path:
        key = json.dumps([family, kwargs], sort_keys=True)
        if key not in made:
            made[key] = make_model(tmp_path_factory.mktemp(family), family, **kwargs)
        return made[key]

    return build


def hf_greedy(model_dir: Path, prompt_ids: list[int], n: int) -> list[int]:
    """Reference greedy decoding with transformers' own forward and DynamicCache."""
    model = _hf_model(model_dir)
    ids = torch.tensor([prompt_ids])
    out: list[int] = []
    with torch.no_grad():
        res = model(input_ids=ids, use_cache=True)
        for _ in range(n):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            past = {_CACHE_KWARG: res.past_key_values}
            res = model(input_ids=torch.tensor([[tok]]), use_cache=True, **past)
    return out


_HF_CACHE: dict[Path, torch.nn.Module] = {}


def _cache_kwarg() -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use whichever this version takes."""
    import inspect

    import transformers

    params = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


_CACHE_KWARG = _cache_kwarg()


def _hf_model(model_dir: Path) -> torch.nn.Module:
    import transformers

    if model_dir not in _HF_CACHE:
        # A GGUF file is read by transformers' own GGUF loader (its own dequantizers): an independent reference.
        where = {"pretrained_model_name_or_path": model_dir}
        if model_dir.suffix == ".gguf":
            where = {"pretrained_model_name_or_path": model_dir.parent, "gguf_file": model_dir.name}
        _HF_CACHE[model_dir] = transformers.AutoModelForCausalLM.from_pretrained(
            **where, dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
    return _HF_CACHE[model_dir]


def hf_logits(model_dir: Path, prompt_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return _hf_model(model_dir)(input_ids=torch.tensor([prompt_ids])).logits[0].float()


# ---- a real server on loopback -------------------------------------------------------------------------------
class LiveServer:
    """promptcache's app under uvicorn in a background thread, on a free loopback port."""

    def __init__(self, config=None, **engine_kwargs) -> None:
        from promptcache.api.server import ServerConfig, create_app
        from promptcache.engine.async_engine import AsyncEngine
        from promptcache.engine.engine import EngineConfig, LLMEngine

        engine_kwargs.setdefault("kv_cache_memory_gb", 0.05)
        self.engine = AsyncEngine(LLMEngine(EngineConfig(**engine_kwargs)))
        self.serve(create_app(self.engine, config or ServerConfig()))

    def serve(self, app) -> None:
        """Run ``app`` under uvicorn on a free loopback port, in a background thread, until it has started."""
        import socket
        import threading
        import time

        import uvicorn

        self.app = app
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    @property
    def core(self):
        """The LLMEngine (read it only while no request runs)."""
        return self.engine.engine

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def live_server():
    """A server with one local tenant (no API keys), shared by a test module."""
    server = LiveServer()
    yield server
    server.stop()


def keyed():
    """A server config with two tenants (alice, bob) and an admin key."""
    from promptcache.api.server import ServerConfig
    from promptcache.api.tenancy import Tenancy, Tenant

    tenants = {"key-alice": Tenant("alice"), "key-bob": Tenant("bob"), "key-admin": Tenant("ops", admin=True)}
    return ServerConfig(tenancy=Tenancy(tenants))


@pytest.fixture(scope="module")
def keyed_server():
    """A server with two tenants (alice, bob) and an admin key."""
    server = LiveServer(keyed())
    yield server
    server.stop()


# ---- a model whose answers vary ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def varied_model(model_factory: Callable[..., Path]) -> Path:
    """A small random llama whose greedy answers vary from token to token. The embedded model's repeat one token,
    so two of its answers agree whatever the KV behind them: compare answers (cache hit vs cold) on this one."""
    return model_factory("llama")


def assert_varied(token_ids: list[int], at_least: int = 4) -> None:
    """An answer used as evidence holds at least ``at_least`` distinct tokens (a comparison on less proves little)."""
    assert len(set(token_ids)) >= at_least, f"too uniform an answer to compare: {token_ids}"


@pytest.fixture(scope="module")
def varied_servers(varied_model: Path):
    """Two keyed servers on a model whose answers vary (the embedded model's repeat one token): prefix caching on,
    and off, where every answer is computed from scratch (the reference for a cache hit's answer)."""
    hit = LiveServer(keyed(), model=str(varied_model))
    cold = LiveServer(keyed(), model=str(varied_model), enable_prefix_caching=False)
    yield hit, cold
    hit.stop()
    cold.stop()


def our_prefill_logits(llm, ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position from our paged forward (one cold prefill of ``ids`` in ``llm``'s engine)."""
    from promptcache import SamplingParams

    eng = llm.engine
    req = eng.add_request(ids, SamplingParams(max_tokens=1))
    assert eng.kv.allocate_prefix(req.seq, ids, len(ids)) == 0
    input_ids, ctx, _ = eng.runner.build([(req, len(ids))])
    with torch.inference_mode():
        logits = eng.model.compute_logits(eng.model(input_ids, ctx, eng.runner.kv_cache))
    eng.scheduler.finish(req)
    return logits
