"""Build the Serve application from a `ServeConfig`: one ingress plus one deployment per model.

`import_path: ftray.serve.app:build_app` in a Serve config file; its `args:` block is the config.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from ftray.serve.config import ServeConfig

__all__ = ["build_app"]


def build_app(args: dict[str, Any] | ServeConfig) -> Application:
    """Serve calls this with the config file's `args`. Bad configs fail here, before any replica starts."""
    from ftray.serve.api import Ingress
    from ftray.serve.deployments import Generator, Scorer

    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args)
    gens = {
        g.name: Generator.options(name=f"gen-{g.name}", **g.deployment.serve_options()).bind(g.model_dump())
        for g in cfg.generation
    }
    scorers = {
        s.name: Scorer.options(name=f"score-{s.name}", **s.deployment.serve_options()).bind(s.model_dump())
        for s in cfg.scorers
    }
    return Ingress.options(**cfg.ingress.serve_options()).bind(cfg.model_dump(), gens, scorers)
