"""Build the Serve application from a `ServeConfig`: one ingress plus one deployment per model.

`import_path: ftray.serve.app:build_app` in a Serve config file; its `args:` block is the config.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from ftray.serve.config import Deployment, ServeConfig

__all__ = ["build_app"]

# Requests over the ingress' own queue are refused by the ingress (an OpenAI-shaped 503); Serve must let
# that many more in, or its proxy refuses them first with a plain-text 503. Refusing takes microseconds,
# so a few dozen in flight at once is plenty.
_REFUSAL_HEADROOM = 32


def _bound_host() -> str | None:
    """The host Serve's HTTP proxies bind, when a Serve instance is running (build_app runs after
    `serve run`/`serve deploy` started it with the config's `http_options`); else None."""
    import ray

    if not ray.is_initialized():
        return None
    try:  # no public API gives the running instance's HTTP options
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
    except Exception:  # noqa: BLE001 - an unknown host is checked again by each ingress replica's keys
        return None
    return client.http_config.host if client is not None else None


def _ingress_options(d: Deployment) -> dict[str, Any]:
    """The ingress' Serve options: it queues and refuses by itself (api._Admission), so Serve sends it up to
    `max_ongoing_requests + max_queued_requests` plus room for the refusals."""
    opts = d.serve_options()
    if d.max_queued_requests >= 0:
        opts["max_ongoing_requests"] = d.max_ongoing_requests + d.max_queued_requests + _REFUSAL_HEADROOM
    return opts


def build_app(args: dict[str, Any] | ServeConfig) -> Application:
    """Serve calls this with the config file's `args`. Bad configs fail here, before any replica starts;
    so does one without API keys that is not explicitly allowed, or that binds beyond loopback."""
    from ftray.serve.api import Ingress
    from ftray.serve.auth import load_api_keys, require_keys
    from ftray.serve.deployments import Generator, Scorer

    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args)
    if not load_api_keys(cfg.auth):  # where the proxy binds matters only without keys
        require_keys(cfg.auth, _bound_host())
    gens = {
        g.name: Generator.options(name=f"gen-{g.name}", **g.deployment.serve_options()).bind(g.model_dump())
        for g in cfg.generation
    }
    scorers = {
        s.name: Scorer.options(name=f"score-{s.name}", **s.deployment.serve_options()).bind(s.model_dump())
        for s in cfg.scorers
    }
    return Ingress.options(**_ingress_options(cfg.ingress)).bind(cfg.model_dump(), gens, scorers)
