"""Token and cost accounting per judge client (what ``GET /judge/v1/usage`` reports)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class Usage:
    requests: int = 0            # answered requests (cache hits included)
    cache_hits: int = 0
    upstream_requests: int = 0   # requests that needed upstream
    upstream_attempts: int = 0   # HTTP calls made upstream, retries included
    retries: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0        # spent upstream
    saved_usd: float = 0.0       # what cache hits would have cost

    def add(self, other: "Usage") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class UsageLedger:
    def __init__(self, price_per_1k_prompt: float, price_per_1k_completion: float):
        self.prices = (price_per_1k_prompt, price_per_1k_completion)
        self.clients: dict[str, Usage] = {}

    def cost(self, usage_block: dict | None) -> tuple[int, int, float]:
        block = usage_block or {}
        p, c = int(block.get("prompt_tokens") or 0), int(block.get("completion_tokens") or 0)
        return p, c, p / 1000 * self.prices[0] + c / 1000 * self.prices[1]

    def record(self, client: str, delta: Usage) -> None:
        self.clients.setdefault(client, Usage()).add(delta)

    def report(self, client: str) -> dict:
        total = Usage()
        for u in self.clients.values():
            total.add(u)
        return {"object": "usage", "client": client, "usage": asdict(self.clients.get(client, Usage())),
                "total": asdict(total), "prices_per_1k": {"prompt": self.prices[0], "completion": self.prices[1]}}
