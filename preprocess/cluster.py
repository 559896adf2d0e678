"""Where the work runs: join a running Ray cluster, or start a private local Ray.

Joining fails in one line, never with a traceback or a silent wait:
- a `host:port` (or `ray://host:port`) with nothing listening is reported within CONNECT_TIMEOUT_S (Ray itself
  retries for a minute or more);
- a join that has not completed within JOIN_TIMEOUT_S (a port that accepts and never answers: Ray would wait on
  it for minutes) is reported naming the address and the limit (`shards.join.within`);
- a cluster started with token authentication (`RAY_AUTH_MODE=token ray start --head ...`) is joined with the
  token Ray would use (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`, where `ray
  get-auth-token --generate` writes it): when one is present and RAY_AUTH_MODE is unset we set it to `token`
  (a cluster without authentication ignores the token); without one, a refused join says what to set.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from cavmae.shards.config import Config, ConfigError
from cavmae.shards.join import JoinTimeout, stderr_held, within
from cavmae.shards.schema import one_line

CONNECT_TIMEOUT_S = 3.0
JOIN_TIMEOUT_S = 60.0  # a healthy cluster is joined in seconds; Ray's own retries of a silent one last minutes
TOKEN_FILE = Path.home() / ".ray" / "auth_token"
AUTH_HINT = ("if the cluster uses token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (print it on "
             "the head with `ray get-auth-token`), or copy the head's ~/.ray/auth_token to this machine")


class ClusterError(ConfigError):
    """The Ray cluster named by --address / RAY_ADDRESS / ray.address cannot be joined (one line)."""


def cluster_address(cfg: Config, address: str | None) -> str | None:
    """The cluster to join: `address`, else RAY_ADDRESS, else cfg.ray.address (None: a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or cfg.ray.address


def check_address(cfg: Config, address: str | None) -> None:
    """Fail in seconds, before a job writes anything into its output folder, when the cluster to join has nothing
    behind its address."""
    address = cluster_address(cfg, address)
    if address:
        _probe(address)


def connect(cfg: Config, workers: int | None, address: str | None) -> bool:
    """Join `address` / RAY_ADDRESS / cfg.ray.address if given, else start a local Ray. True if we started it
    (and must shut it down)."""
    address = cluster_address(cfg, address)
    if address:
        _probe(address)
        token = _use_token()  # before Ray is imported: its core reads the authentication settings once

    import ray

    if ray.is_initialized():
        return False
    if address:
        _join(address, token)
    else:
        n = workers or cfg.ray.workers or os.cpu_count() or 1
        # A private instance ("local": never attach to another Ray found running on this machine),
        # advertising loopback only (nothing outside this machine needs to reach it). Ray's INFO start-up lines
        # are not ours to print (its warnings and errors are; a task's error reaches the job driver as its result).
        ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
    return True


def _use_token() -> str | None:
    """Point Ray at the token found on this machine (if any); where it came from."""
    token = _token_source()
    if token and not os.environ.get("RAY_AUTH_MODE"):
        os.environ["RAY_AUTH_MODE"] = "token"
    if token and token != "RAY_AUTH_TOKEN":
        os.environ["RAY_AUTH_TOKEN_PATH"] = token  # Ray's own lookup ignores $HOME (it asks the password database)
    return token


def _join(address: str, token: str | None) -> None:
    import ray

    with stderr_held() as held:
        try:
            # (ray.init in `within`'s thread installs no SIGTERM handler: a TERM ends the driver at once)
            within(JOIN_TIMEOUT_S, lambda: ray.init(address=address, log_to_driver=False,
                                                    logging_level=logging.WARNING), f"joining {address}")
            return
        except JoinTimeout:  # (no ray.shutdown: the join is still under way in its thread)
            raise ClusterError(f"{address} accepts connections but joining the Ray cluster there did not complete "
                               f"within {JOIN_TIMEOUT_S:g} s; check that it is a Ray head's port") from None
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
            ray.shutdown()
            first = one_line(exc)[:300]
    if "Authentication token is missing or incorrect" in held[0]:
        where = f"the token from {token} is not the cluster's" if token else "no token is set here"
        raise ClusterError(f"the Ray cluster at {address} uses token authentication and {where}; "
                           f"{AUTH_HINT.split(', ', 1)[1]}")
    hint = f" (token from {token})" if token else f"; {AUTH_HINT}"
    raise ClusterError(f"cannot join the Ray cluster at {address}: {first}{hint}")


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
