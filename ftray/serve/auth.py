"""API keys: where they come from, and whether an app may start without them. No Ray, no FastAPI.

Loopback is not a boundary: behind `kubectl port-forward`, a same-host reverse proxy or a mesh sidecar
every client looks local. So an app starts without keys only when its config says `auth.allow_no_keys:
true` (with a warning), and never when its HTTP proxy binds beyond loopback. `ftray serve --host` and
`build_app` (what `serve run` / `serve deploy` call with the config's `args`) both check through
`require_keys`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from ftray.serve.config import Auth

__all__ = ["AuthConfigError", "is_loopback", "load_api_keys", "require_keys"]

log = logging.getLogger("ftray.serve")


class AuthConfigError(ValueError):
    """The serve config may not start as it is; one line naming the setting to change."""


def load_api_keys(auth: Auth) -> set[str]:
    keys: set[str] = set()
    if auth.api_keys_env and os.environ.get(auth.api_keys_env):
        keys |= {k.strip() for k in os.environ[auth.api_keys_env].split(",") if k.strip()}
    if auth.api_keys_file:
        try:
            lines = Path(auth.api_keys_file).expanduser().read_text().splitlines()
        except OSError as e:
            raise AuthConfigError(f"auth.api_keys_file: {auth.api_keys_file}: {e.strerror or e}") from None
        keys |= {x.strip() for x in lines if x.strip() and not x.startswith("#")}
    return keys


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def require_keys(auth: Auth, host: str | None, where: str = "http_options.host") -> set[str]:
    """The API keys, or AuthConfigError: with no key, `host` (where the HTTP proxy binds; None when not
    known) must be loopback and `auth.allow_no_keys` true. `where` names the setting that holds `host`."""
    keys = load_api_keys(auth)
    if keys:
        return keys
    sources = (f"${auth.api_keys_env} or " if auth.api_keys_env else "") + "`auth.api_keys_file`"
    if host is not None and not is_loopback(host):
        raise AuthConfigError(f"{where} {host} listens beyond loopback and no API key is configured: set {sources}")
    if not auth.allow_no_keys:
        raise AuthConfigError(
            f"no API key is configured: set {sources}, or `auth.allow_no_keys: true` to let in every client that "
            "reaches the port (a port-forward or a same-host proxy makes every client look local)"
        )
    log.warning(
        "ftray serve: no API keys (auth.allow_no_keys: true): every client that reaches the port is let in; "
        "loopback is no boundary behind a port-forward, a same-host proxy or a mesh sidecar"
    )
    return keys
