"""Turn logits into tokens: greedy, temperature, top-k, top-p, per-request seeds, top-n logprobs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from promptcache.engine.request import Logprob, SamplingParams
from promptcache.engine.structured import TokenMasks


class Sampler:
    """Samples one token per row of logits. Seeded requests draw only from their own generator, so the same
    seed gives the same tokens whatever else shares the batch."""

    def __init__(self, device: torch.device, seed: int | None = None):
        self.device = device
        self._shared = torch.Generator(device=device)
        if seed is None:
            self._shared.seed()
        else:
            self._shared.manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}
        self.masks = TokenMasks()

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._shared
        gen = self._generators.get(request_id)
        if gen is None:
            gen = self._generators[request_id] = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
        return gen

    def sample(
        self, logits: torch.Tensor, request_ids: Sequence[str], params: Sequence[SamplingParams],
        matchers: Sequence[Any] | None = None,
    ) -> tuple[list[int], list[dict[int, Logprob] | None]]:  # fmt: skip
        """logits [S, V] float32 -> a token per row, and its logprobs dict where the request asked for them.

        ``matchers`` (a grammar state or None per row): constrained rows sample only among the tokens their grammar
        allows; logprobs stay those of the model's own distribution.
        """
        choose_from = logits
        rows = [i for i, m in enumerate(matchers or ()) if m is not None]
        if rows:
            bitmask = self.masks.fill([matchers[i] for i in rows], logits.shape[1])  # type: ignore[index]
            drawn = [j for j, i in enumerate(rows) if not params[i].greedy]
            if drawn:  # sampled rows draw from the allowed tokens only
                idx = torch.tensor([rows[j] for j in drawn], device=logits.device)
                choose_from = logits.index_copy(0, idx, self.masks.masked(logits.index_select(0, idx), bitmask[drawn]))
        if all(p.greedy for p in params):
            tokens = choose_from.argmax(dim=-1)
        else:
            tokens = self._sample_mixed(choose_from, request_ids, params)
        for j, i in enumerate(rows):  # greedy rows: the model's pick, unless the grammar refuses it
            if params[i].greedy and not self.masks.allows(bitmask[j], int(tokens[i])):
                tokens[i] = self.masks.masked(logits[i : i + 1], bitmask[j : j + 1]).argmax(dim=-1)[0]
        token_list = tokens.tolist()
        if all(p.logprobs is None for p in params):
            return token_list, [None] * len(token_list)
        return token_list, self._logprobs(logits, tokens, params)

    def _sample_mixed(
        self, logits: torch.Tensor, request_ids: Sequence[str], params: Sequence[SamplingParams]
    ) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        idx = torch.tensor(rows, device=logits.device)
        temps = torch.tensor([params[i].temperature for i in rows], device=logits.device, dtype=logits.dtype)
        scaled = logits.index_select(0, idx) / temps[:, None]
        top_ks = [params[i].top_k for i in rows]
        top_ps = [params[i].top_p for i in rows]
        if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
            scaled = _apply_top_k_top_p(scaled, top_ks, top_ps)
        probs = torch.softmax(scaled, dim=-1)
        for j, i in enumerate(rows):
            gen = self._generator(request_ids[i], params[i])
            tokens[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
        return tokens

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]
    ) -> list[dict[int, Logprob] | None]:
        """Log-probabilities of the model's own distribution (before temperature and truncation), as vLLM reports."""
        lp = torch.log_softmax(logits, dim=-1)
        chosen = lp.gather(1, tokens[:, None])
        ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
        n_max = max(p.logprobs or 0 for p in params)
        top_v, top_i = lp.topk(n_max, dim=-1) if n_max else (lp[:, :0], lp[:, :0].long())
        top_v, top_i, chosen_l, tok_l = top_v.tolist(), top_i.tolist(), chosen[:, 0].tolist(), tokens.tolist()
        out: list[dict[int, Logprob] | None] = []
        for r, p in enumerate(params):
            if p.logprobs is None:
                out.append(None)
                continue
            entry = {tok_l[r]: Logprob(chosen_l[r], ranks[r])}
            for k in range(p.logprobs):
                entry.setdefault(top_i[r][k], Logprob(top_v[r][k], k + 1))
            out.append(entry)
        return out


def _apply_top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and nucleus; the most likely token always survives."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    ks = torch.tensor([k if k > 0 else vocab for k in top_ks], device=logits.device)
    # ascending order: the top-k are the last k columns
    kth = sorted_logits.gather(1, (vocab - ks.clamp(max=vocab))[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    ps = torch.tensor(top_ps, device=logits.device, dtype=logits.dtype)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - ps)[:, None]
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
