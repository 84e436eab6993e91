"""Prices per million tokens, and what a request cost by component.

A pricing file is TOML, one table per model (or a single flat table used for every model):

    [models."promptcache-default"]
    input = 1.00          # uncached prompt tokens
    cached_input = 0.10   # prompt tokens read from the cache
    cache_write_5m = 1.25 # prompt tokens written under a 5-minute breakpoint
    cache_write_1h = 2.00 # prompt tokens written under a 1-hour breakpoint
    output = 4.00         # generated tokens

Presets are shaped like the providers' price lists (cached read 0.1x input, writes 1.25x / 2x, output 4-8x).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRICE_FIELDS = ("input", "cached_input", "cache_write_5m", "cache_write_1h", "output")


@dataclass(frozen=True)
class Pricing:
    """USD per million tokens of each kind."""

    input: float
    cached_input: float
    cache_write_5m: float
    cache_write_1h: float
    output: float

    def cost(self, usage: TokenUsage) -> dict[str, float]:
        """USD by component and in total for one request's token counts."""
        per = 1e-6
        parts = {
            "input": usage.uncached_input_tokens * self.input * per,
            "cached_input": usage.cached_tokens * self.cached_input * per,
            "cache_write_5m": usage.cache_write_5m_tokens * self.cache_write_5m * per,
            "cache_write_1h": usage.cache_write_1h_tokens * self.cache_write_1h * per,
            "output": usage.output_tokens * self.output * per,
        }
        return {**{k: round(v, 10) for k, v in parts.items()}, "total": round(sum(parts.values()), 10)}


PRESETS: dict[str, Pricing] = {
    # input, cached read (0.1x), 5-minute write (1.25x), 1-hour write (2x), output
    "default": Pricing(1.00, 0.10, 1.25, 2.00, 4.00),
    "anthropic-sonnet": Pricing(3.00, 0.30, 3.75, 6.00, 15.00),
    "anthropic-haiku": Pricing(1.00, 0.10, 1.25, 2.00, 5.00),
    "openai-gpt-5": Pricing(1.25, 0.125, 1.5625, 2.50, 10.00),
    "openai-gpt-4.1": Pricing(2.00, 0.50, 2.50, 4.00, 8.00),
}


@dataclass
class TokenUsage:
    """One request's tokens by kind: prompt = cached + cache writes + uncached rest."""

    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)  # cached_tokens by the tier read from

    @property
    def cache_write_tokens(self) -> int:
        return self.cache_write_5m_tokens + self.cache_write_1h_tokens

    @property
    def uncached_input_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens - self.cache_write_tokens


class PriceTable:
    """Prices per model name, with a fallback for models the file does not name."""

    def __init__(self, by_model: dict[str, Pricing], fallback: Pricing):
        self.by_model = by_model
        self.fallback = fallback

    def for_model(self, model: str) -> Pricing:
        return self.by_model.get(model, self.fallback)

    @classmethod
    def preset(cls, name: str) -> PriceTable:
        if name not in PRESETS:
            raise ValueError(f"unknown pricing preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls({}, PRESETS[name])

    @classmethod
    def from_file(cls, path: str | Path) -> PriceTable:
        """Read a TOML pricing file (see the module docstring); raises ValueError naming what is wrong."""
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"cannot read pricing file {path}: {err}") from err
        by_model = {name: _pricing(table, f"models.{name}") for name, table in raw.get("models", {}).items()}
        flat = {k: v for k, v in raw.items() if k != "models"}
        fallback = _pricing(flat, "top level") if flat else PRESETS["default"]
        return cls(by_model, fallback)

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {"*": asdict(self.fallback), **{m: asdict(p) for m, p in self.by_model.items()}}


def _pricing(table: dict[str, object], where: str) -> Pricing:
    missing = [f for f in PRICE_FIELDS if f not in table]
    if missing:
        raise ValueError(f"pricing file: {where} lacks {', '.join(missing)}")
    values = {}
    for f in PRICE_FIELDS:
        v = table[f]
        if not isinstance(v, int | float) or isinstance(v, bool) or v < 0:
            raise ValueError(f"pricing file: {where}.{f} must be a number >= 0, got {v!r}")
        values[f] = float(v)
    return Pricing(**values)


def write_pricing_file(path: str | Path, model: str, pricing: Pricing) -> None:
    """Write one model's prices as a pricing file (used by calibration)."""
    lines = [f'[models."{model}"]'] + [f"{f} = {getattr(pricing, f):.6g}" for f in PRICE_FIELDS]
    Path(path).write_text("\n".join(lines) + "\n")
