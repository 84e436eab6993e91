"""The replicas behind a router: what model they serve, whether each is up, and the check that admits one.

The first replica to answer defines the fleet's model: its fingerprint, dtype, block size and exact tokenizer (sent
over HTTP: a router needs no model files). Every replica must match it, and must compute the same block addresses
as the router on test vectors (a chat, an Anthropic body with a breakpoint, raw text): a router that hashed
something else than its replicas cache would predict hits that never happen.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from promptcache.api.prompts import AnthropicPromptBody, PromptRenderer
from promptcache.api.tenancy import Tenant
from promptcache.cache.hashing import BlockHash, chain_hashes, root_hash
from promptcache.replay import ReplayStore
from promptcache.tokenizer import Tokenizer

log = logging.getLogger("promptcache.fleet")
CHECK_SALT = "pc-router-check"  # test vectors are hashed in a namespace of their own
_SYSTEM = "You are a terse assistant for the fleet check. " * 4
CHECK_TEXT = {"prompt": "The router and its replicas must agree on every block address. " * 4}
CHECK_CHAT = {"messages": [
    {"role": "system", "content": _SYSTEM},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4, as ever."},
    {"role": "user", "content": "And 3 + 3? Answer with digits only."},
]}  # fmt: skip
CHECK_ANTHROPIC = {"api": "anthropic", "system": [
    {"type": "text", "text": _SYSTEM, "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": "Name one prime number greater than ten."}]}  # fmt: skip


class _Unchecked(Exception):
    """The join check could not run (the replica did not answer in time): no verdict."""


@dataclass
class FleetModel:
    """What every replica of the fleet serves: one model, one tokenizer, one address space."""

    served_name: str
    fingerprint: str
    dtype: str
    block_size: int
    scope: str  # fleet/keys.py: the Redis scope of events, loads and affinities
    kv_prefix: str | None  # the replicas' Redis KV key prefix (None: they share no Redis tier)
    tokenizer_digest: str
    renderer: PromptRenderer

    def addresses(self, namespace: str, ids: list[int]) -> list[BlockHash]:
        """The addresses a replica would look up for a prompt: full blocks, leaving at least one token to compute."""
        usable = (len(ids) - 1) // self.block_size if len(ids) > 1 else 0
        root = root_hash(self.fingerprint, self.dtype, namespace)
        return chain_hashes(root, ids[: usable * self.block_size], self.block_size)

    def same_as(self, info: dict[str, Any]) -> str | None:
        """Why a replica's info does not fit this fleet (None: it fits)."""
        for key, mine in (("fingerprint", self.fingerprint), ("dtype", self.dtype), ("block_size", self.block_size),
                          ("tokenizer_digest", self.tokenizer_digest), ("model", self.served_name)):  # fmt: skip
            if info.get(key) != mine:
                return f"its {key} is {info.get(key)!r}, the fleet's is {mine!r}"
        return None


@dataclass
class Replica:
    url: str
    name: str | None = None
    state: str = "joining"  # joining | up | down | refused
    reason: str = ""
    epoch: str | None = None
    failures: int = 0
    since: float = field(default_factory=time.time)
    rates: dict[str, Any] | None = None  # its measured recompute and tier load costs (from /health)

    @property
    def up(self) -> bool:
        return self.state == "up"

    def set_state(self, state: str, reason: str = "") -> None:
        if state != self.state:
            log.warning("replica %s (%s): %s -> %s %s", self.name, self.url, self.state, state, reason)
            self.since = time.time()
        self.state, self.reason = state, reason


class ReplicaSet:
    """The replicas, their health (checked every ``interval``) and the fleet model; admits joiners by the check."""

    def __init__(
        self,
        urls: list[str],
        admin_headers: dict[str, str],
        check_tenant: Tenant,
        replay: Callable[[str], ReplayStore | None],
        interval: float = 1.0,
        timeout: float = 2.0,
    ):
        self.replicas = [Replica(u.rstrip("/")) for u in urls]
        self.admin_headers = admin_headers
        self.check_tenant = check_tenant
        self._replay = replay  # fingerprint -> the replay store (Redis) the replicas share
        self.interval, self.timeout = interval, timeout
        self.model: FleetModel | None = None
        self.on_join: Callable[[Replica], Awaitable[None] | None] | None = None
        self._client = httpx.AsyncClient(timeout=timeout)
        self._sync = httpx.Client(timeout=30.0)
        self._task: asyncio.Task[None] | None = None
        self._joining = asyncio.Lock()  # NOTE: one join at a time: two first joins must not both define the model

    def by_name(self, name: str) -> Replica | None:
        return next((r for r in self.replicas if r.name == name), None)

    def up(self) -> list[Replica]:
        return [r for r in self.replicas if r.up]

    # -- the health loop --
    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._client.aclose()
        self._sync.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_all()
            except Exception:  # the health loop must outlive any replica's answer
                log.exception("checking replicas failed")

    async def check_all(self) -> None:
        if self.model is None:  # the first replica (in --replica order) that answers defines the fleet's model
            for r in self.replicas:
                await self.check(r)
            return
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    async def check(self, replica: Replica) -> None:
        try:
            resp = await self._client.get(f"{replica.url}/health")
            health = resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            health = None
        if health is None:
            replica.failures += 1
            if replica.state == "up":
                replica.set_state("down", "failed its health check")
            return
        replica.failures = 0
        replica.rates = health.get("tier_rates")
        if replica.state == "refused" and health.get("epoch") == replica.epoch:
            return  # the same process: still refused
        if replica.state != "up" or health.get("epoch") != replica.epoch:
            await self.join(replica)  # a new or restarted process: check it again

    def failed(self, replica: Replica, why: str) -> None:
        """A request could not reach it: out of the rotation until its health check passes again."""
        if replica.state == "up":
            replica.failures += 1
            replica.set_state("down", why)

    # -- joining --
    async def join(self, replica: Replica) -> None:
        async with self._joining:
            await self._join(replica)

    async def _join(self, replica: Replica) -> None:
        try:
            info = await self._admin_get(replica, "/v1/fleet/info")
        except (httpx.HTTPError, ValueError, KeyError) as err:
            replica.set_state("down", f"no fleet info: {err}")
            return
        replica.epoch = info.get("epoch")
        name = info.get("name")
        other = self.by_name(name)
        if other is not None and other is not replica and other.state != "refused":
            replica.set_state("refused", f"another replica ({other.url}) has the name {name!r}")
            return
        replica.name = name
        if self.model is None:
            try:
                self.model = await self._learn_model(replica, info)
            except (httpx.HTTPError, ValueError, KeyError) as err:
                replica.set_state("down", f"cannot read its tokenizer: {err}")
                return
        try:
            why = self.model.same_as(info) or await self._check_vectors(replica)
        except _Unchecked as err:  # a busy or failing replica is not a different one: checked again later
            replica.set_state("down", str(err))
            return
        if why:
            replica.set_state("refused", why)
            return
        replica.set_state("up")
        if self.on_join is not None:
            done = self.on_join(replica)
            if done is not None:
                await done

    async def _learn_model(self, replica: Replica, info: dict[str, Any]) -> FleetModel:
        tok = Tokenizer.from_dict(await self._admin_get(replica, "/v1/fleet/tokenizer"))
        if tok.digest() != info["tokenizer_digest"]:
            raise ValueError("the tokenizer sent does not match its digest")
        from promptcache.fleet import keys

        fp = info["fingerprint"]
        return FleetModel(
            served_name=info["model"], fingerprint=fp, dtype=info["dtype"], block_size=int(info["block_size"]),
            scope=keys.scope(fp, info["dtype"], int(info["block_size"])), kv_prefix=info.get("kv_prefix"),
            tokenizer_digest=info["tokenizer_digest"], renderer=PromptRenderer(tok, self._replay(fp)),
        )  # fmt: skip

    async def _check_vectors(self, replica: Replica) -> str | None:
        """None when the replica's addresses equal ours on every test vector, else what differs."""
        assert self.model is not None
        model, tenant = self.model, self.check_tenant
        namespace = tenant.namespace(CHECK_SALT)
        vectors: list[tuple[str, dict[str, Any]]] = [("text", CHECK_TEXT)]
        if model.renderer.tokenizer.chat_templates:
            vectors += [("chat", CHECK_CHAT), ("anthropic", CHECK_ANTHROPIC)]
        for label, body in vectors:
            if label == "anthropic":
                ids = model.renderer.anthropic(tenant.name, AnthropicPromptBody.model_validate(body)).ids
            else:
                ids, _ = model.renderer.explain_ids("openai", tenant.name, body)
            mine = [h.hex() for h in model.addresses(namespace, ids)]
            try:
                resp = await self._client.post(
                    f"{replica.url}/v1/cache/explain", headers=self.admin_headers,
                    json={**body, "cache_salt": CHECK_SALT, "addresses": True}, timeout=30.0,
                )  # fmt: skip
                theirs = resp.json().get("block_addresses")
            except (httpx.HTTPError, ValueError) as err:
                raise _Unchecked(f"the address check could not run: {type(err).__name__}: {err}") from err
            if theirs != mine:
                first = next((i for i, (a, b) in enumerate(zip(mine, theirs or [])) if a != b), None)
                return (f"its block addresses differ from the router's on the {label} test vector ({len(theirs or [])}"
                        f" against {len(mine)} blocks, first difference at block {first}): another tokenizer, chat "
                        "template or hashing")  # fmt: skip
        return None

    async def _admin_get(self, replica: Replica, path: str) -> Any:
        resp = await self._client.get(f"{replica.url}{path}", headers=self.admin_headers, timeout=30.0)
        resp.raise_for_status()
        return resp.json()

    def snapshot(self, name: str) -> dict[str, Any] | None:
        """A replica's KV snapshot (from the event follower's thread); None when it cannot be had."""
        replica = self.by_name(name)
        if replica is None or replica.state in ("refused", "down"):
            return None
        try:
            resp = self._sync.get(f"{replica.url}/v1/fleet/snapshot", headers=self.admin_headers)
            resp.raise_for_status()
            return resp.json()
        except (httpx.HTTPError, ValueError) as err:
            log.warning("replica %s: no snapshot: %s", name, err)
            return None

    def describe(self) -> list[dict[str, Any]]:
        return [{"url": r.url, "name": r.name, "state": r.state, "reason": r.reason, "epoch": r.epoch,
                 "since": r.since} for r in self.replicas]  # fmt: skip
