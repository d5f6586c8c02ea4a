"""Serve what ftray trains: OpenAI-compatible HTTP (and Python handles) over Ray Serve.

`build_app(config)` makes the application; `ftray serve RUN...` and `serve run deploy/*.yaml` use it.
The Python handle calls (for RLHF scoring) are documented in `ftray.serve.deployments`.
"""

from ftray.serve.config import ServeConfig

__all__ = ["ServeConfig", "build_app", "config_from_runs"]


def build_app(args):
    from ftray.serve.app import build_app as _build

    return _build(args)


def config_from_runs(*args, **kw):
    from ftray.serve.runs import config_from_runs as _f

    return _f(*args, **kw)
