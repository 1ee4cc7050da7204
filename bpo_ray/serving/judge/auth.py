"""Client bearer tokens for the judge proxy, read from the environment and compared in constant time.

``BPO_JUDGE_TOKENS`` (the name is ``judge.client_tokens_env``) holds ``name:token`` pairs or bare
tokens, comma-separated. Clients are known by name in usage reports and logs; a token is never
logged, echoed or stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Optional

from bpo_ray.serving.errors import APIError


def parse_client_tokens(text: str) -> dict[str, str]:
    """``"alice:t1,bob:t2"`` or ``"t1,t2"`` -> {token: client name}."""
    clients: dict[str, str] = {}
    entries = [e.strip() for e in (text or "").split(",") if e.strip()]
    for i, entry in enumerate(entries):
        name, _, token = entry.partition(":") if ":" in entry else (f"client-{i + 1}", "", entry)
        if token:
            clients[token.strip()] = name.strip() or f"client-{i + 1}"
    return clients


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class ClientAuth:
    """Maps ``Authorization: Bearer <token>`` to a client name, or refuses with 401."""

    def __init__(self, clients: dict[str, str], env_name: str = "BPO_JUDGE_TOKENS"):
        self._clients = [(_digest(t), name) for t, name in clients.items()]
        self.env_name = env_name

    @classmethod
    def from_env(cls, env_name: str) -> "ClientAuth":
        return cls(parse_client_tokens(os.environ.get(env_name, "")), env_name)

    @property
    def configured(self) -> bool:
        return bool(self._clients)

    def authenticate(self, header: Optional[str]) -> str:
        if not self._clients:
            raise APIError(401, f"no client tokens are configured on the server (set {self.env_name})",
                           code="no_tokens_configured")
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing bearer token (Authorization: Bearer <token>)", code="missing_token",
                           headers={"WWW-Authenticate": "Bearer"})
        given = _digest(token.strip())
        found: Optional[str] = None
        for digest, name in self._clients:  # no early exit: timing does not depend on which token matched
            if hmac.compare_digest(given, digest):
                found = name
        if found is None:
            raise APIError(401, "invalid bearer token", code="invalid_token", headers={"WWW-Authenticate": "Bearer"})
        return found
