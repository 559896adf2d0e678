"""Where the work runs: join a running Ray cluster, or start a private local Ray.

Joining fails in one line, never with a traceback or a silent wait:
- a `host:port` (or `ray://host:port`) with nothing listening is reported within CONNECT_TIMEOUT_S (Ray itself
  retries for a minute or more);
- a cluster started with token authentication (`RAY_AUTH_MODE=token ray start --head ...`) is joined with the
  token Ray would use (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`, where `ray
  get-auth-token --generate` writes it): when one is present and RAY_AUTH_MODE is unset we set it to `token`
  (a cluster without authentication ignores the token); without one, a refused join says what to set.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from shards.config import Config, ConfigError

CONNECT_TIMEOUT_S = 3.0
TOKEN_FILE = Path.home() / ".ray" / "auth_token"
AUTH_HINT = ("if the cluster uses token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (print it on "
             "the head with `ray get-auth-token`) or copy the head's ~/.ray/auth_token here")


class ClusterError(ConfigError):
    """The Ray cluster named by --address / RAY_ADDRESS / ray.address cannot be joined (one line)."""


def connect(cfg: Config, workers: int | None, address: str | None) -> bool:
    """Join `address` / RAY_ADDRESS / cfg.ray.address if given, else start a local Ray. True if we started it
    (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or cfg.ray.address
    if address:
        _join(address)
    else:
        n = workers or cfg.ray.workers or os.cpu_count() or 1
        # A private instance ("local": never attach to another Ray found running on this machine),
        # advertising loopback only (nothing outside this machine needs to reach it).
        ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    return True


def _join(address: str) -> None:
    import ray

    _probe(address)
    token = _token_source()
    if token and not os.environ.get("RAY_AUTH_MODE"):
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        ray.shutdown()
        first = " ".join(str(exc).split())[:300] or type(exc).__name__
        hint = f" (token from {token})" if token else f"; {AUTH_HINT}"
        raise ClusterError(f"cannot join the Ray cluster at {address}: {first}{hint}") from None


def _probe(address: str) -> None:
    """A TCP connect to host:port (bounded), so that an address with nothing behind it fails in seconds."""
    hostport = address.split("://", 1)[1] if address.startswith("ray://") else address
    if address == "auto" or "://" in hostport or ":" not in hostport:
        return  # `auto` finds the local cluster itself (and fails at once when there is none)
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            return
    except ValueError:
        raise ClusterError(f"--address {address!r}: expected host:port, ray://host:port or auto") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClusterError(f"no Ray cluster answers at {address} ({reason}); start one with "
                           f"`ray start --head --port={port}` or check the address") from None


def _token_source() -> str | None:
    """Where Ray would read an authentication token from on this machine, if anywhere."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and Path(path).is_file():
        return path
    if TOKEN_FILE.is_file():
        return str(TOKEN_FILE)
    return None
