"""Who is calling: API keys map to tenants; a tenant's cache namespace never meets another tenant's."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptcache.api.errors import APIError

LOCAL_TENANT = "local"


@dataclass(frozen=True)
class Tenant:
    name: str
    admin: bool = False
    max_concurrent: int | None = None  # requests this tenant may run at once (None: the server's default)
    max_tokens: int | None = None  # the most output tokens one request may ask for (None: the server's default)

    def namespace(self, cache_salt: str | None = None) -> str:
        """The cache namespace: the tenant, partitioned further by an optional salt.

        NOTE: injective: each field is length-prefixed, so no (tenant, salt) pair names another's namespace (with a
        separator, tenant "a" with salt "b<sep>" was tenant "a<sep>b" with none). The fleet router uses this same
        function, so replicas and routers compute the same addresses.
        """
        salt = cache_salt or ""
        return f"{len(self.name)}:{self.name}:{len(salt)}:{salt}"


class Tenancy:
    """Resolves ``Authorization: Bearer KEY`` or ``x-api-key: KEY`` to a tenant.

    With no keys configured, every caller is the one local tenant (and admin); the server then binds to loopback.
    """

    def __init__(self, keys: Mapping[str, Tenant] | None = None):
        self.keys = dict(keys or {})
        for tenant in self.keys.values():
            check_tenant_name(tenant.name)
        # NOTE: keys are looked up by their SHA-256, so the lookup's time tells nothing about how much of a guessed
        # key matched (a dict of the keys themselves compares strings, which stops at the first difference).
        self._by_digest = {_digest(k): (k, t) for k, t in self.keys.items()}

    @property
    def open(self) -> bool:
        return not self.keys

    @classmethod
    def from_options(cls, api_keys: list[str] | None = None, api_keys_file: str | None = None,
                     admin_keys: list[str] | None = None) -> Tenancy:  # fmt: skip
        """Keys from ``--api-key`` (each its own tenant, named by the key's position) and a JSON file mapping
        each key to its tenant's name, or to ``{"tenant": name, "admin": true, "max_concurrent": n, "max_tokens": n}``
        (every field but the name optional)."""
        keys: dict[str, Tenant] = {}
        for i, key in enumerate(api_keys or []):
            keys[key] = Tenant(f"key-{i}")
        if api_keys_file:
            try:
                raw = json.loads(Path(api_keys_file).read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"cannot read API keys file {api_keys_file}: {err}") from err
            if not isinstance(raw, dict):
                raise ValueError(f"API keys file {api_keys_file} must hold a JSON object of key -> tenant")
            for key, value in raw.items():
                if isinstance(value, str):
                    keys[key] = Tenant(value)
                elif isinstance(value, dict) and isinstance(value.get("tenant"), str):
                    limits = {name: _positive(value.get(name), name) for name in ("max_concurrent", "max_tokens")}
                    keys[key] = Tenant(value["tenant"], bool(value.get("admin", False)), **limits)
                else:
                    raise ValueError(f"API keys file: the value for a key must be a tenant name, got {value!r}")
        for key in admin_keys or []:
            keys[key] = dataclasses.replace(keys[key], admin=True) if key in keys else Tenant("admin", True)
        return cls(keys)

    def resolve(self, headers: Mapping[str, str]) -> Tenant:
        if self.open:
            return Tenant(LOCAL_TENANT, admin=True)
        key = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if key is None and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if not key:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                           code="invalid_api_key")  # fmt: skip
        found = self._by_digest.get(_digest(key))
        if found is None or not hmac.compare_digest(found[0].encode(), key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return found[1]


def _positive(value: Any, name: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"API keys file: {name} must be a positive integer, got {value!r}")
    return value


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def check_tenant_name(name: str) -> None:
    """Refuse a tenant name that is empty or holds control characters (they have no place in names, logs or keys)."""
    if not name:
        raise ValueError("a tenant name must not be empty")
    bad = next((c for c in name if unicodedata.category(c).startswith("C")), None)
    if bad is not None:
        raise ValueError(f"tenant name {name!r} holds the control character {bad!r}")
