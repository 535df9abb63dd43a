"""Connecting the Ray jobs (extract-boxes, shard) to a cluster without waiting forever, and a Ray for one job
(`ray_session`).

`ray.init(address="HOST:PORT")` has no connection timeout: with nothing listening there, or a server that is not
Ray's, it retries for as long as it runs. So an explicit address (`--ray-address`, else `RAY_ADDRESS`) must first
take a TCP connection and answer the gRPC (HTTP/2) handshake within a few seconds, and a failure is one line
naming the address.
"""
from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

CONNECT_TIMEOUT_S = 5.0
RAY_HEAD_PORT = 6379      # `ray start --head` default (GCS)
RAY_CLIENT_PORT = 10001   # the Ray Client server of `ray://HOST` addresses


class RayAddressError(ValueError):
    """A Ray address that cannot be reached or parsed (the message names it)."""


def _source(address: str | None) -> tuple[str, str] | None:
    """(how to name it in a message, the address): the option, else RAY_ADDRESS; None when neither is set."""
    if address:
        return f"--ray-address {address}", address.strip()
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return (f"RAY_ADDRESS={env}", env) if env else None


def check_ray_address(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise RayAddressError unless the cluster address (the option, else RAY_ADDRESS) takes a TCP connection and
    answers gRPC's HTTP/2 handshake within `timeout` seconds, and (a GCS port) accepts the token this shell would
    send: "HOST:PORT" is the head's GCS port, "ray://HOST[:PORT]" its Ray Client port. No
    address, "local" and "auto" start or find a local runtime (ray.init fails fast by itself there); other
    schemes are left to ray.init. Nothing is checked when this process has initialised Ray already (it is reused)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        probe_ray_address(address, timeout)


def probe_ray_address(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """check_ray_address's checks, whatever this process has initialised."""
    source = _source(address)
    if source is None or source[1] in ("local", "auto"):
        return
    name, value = source
    client = value.startswith("ray://")
    if "://" in value and not client:
        return
    try:
        parts = urlsplit(value if client else f"//{value}")
        host, port = parts.hostname, parts.port or (RAY_CLIENT_PORT if client else RAY_HEAD_PORT)
    except ValueError as e:  # a port that is not a number or out of range
        raise RayAddressError(f"{name}: expected HOST:PORT or ray://HOST:PORT ({e})") from None
    if not host:
        raise RayAddressError(f"{name}: expected HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            speaks_grpc = _answers_http2(conn)
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise RayAddressError(f"{name}: cannot reach a Ray head at {host}:{port} within {timeout:g} s ({why}); "
                              "is it running (`ray start --head`) and is the address right?") from None
    if not speaks_grpc:
        raise RayAddressError(f"{name}: {host}:{port} answers, but not as a Ray head (no gRPC/HTTP-2 handshake); "
                              f"the head's port is {RAY_HEAD_PORT} (`ray start --head --port`) or "
                              f"{RAY_CLIENT_PORT} for ray://")
    if not client:
        refused = _token_refused(host, port, timeout)
        if refused:
            raise RayAddressError(f"{name}: the Ray head at {host}:{port} refused the connection: it uses token "
                                  f"authentication and {refused}. Pass the cluster's token the way Ray reads it: "
                                  "export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token> (or RAY_AUTH_TOKEN_PATH="
                                  "<file holding it>, or the file ~/.ray/auth_token); `ray get-auth-token` on the "
                                  "head prints it. odis never takes the token on its command line.")


def client_token() -> tuple[str | None, str]:
    """(the token ray.init would send, where it comes from), by Ray's precedence: none with RAY_AUTH_MODE=disabled;
    else RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH's file, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled is set here"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        token = Path(path).read_text().strip()
    except OSError:
        return None, "no token is set here"
    return (token, f"the token in {path}") if token else (None, "no token is set here")


def _token_refused(host: str, port: int, timeout: float) -> str | None:
    """Why the head's GCS refuses the token this process would send (one cheap RPC, GetClusterId: the first call
    ray.init makes), or None when it accepts it, needs none, or the check itself cannot run."""
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub
    except (ImportError, AttributeError):  # a Ray without this RPC has no token authentication either
        return None
    token, source = client_token()
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            stub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout, metadata=metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                return source if token is None else f"{source} is not the cluster's"
    return None


# An HTTP/2 client preface and an empty SETTINGS frame (RFC 9113 3.4, 6.5): gRPC, which Ray's GCS and its client
# server speak, answers with a SETTINGS frame; anything else (ssh, HTTP/1, a silent port) does not.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _answers_http2(conn: socket.socket) -> bool:
    """Whether the peer answers the HTTP/2 preface with a frame header of type SETTINGS (4)."""
    conn.sendall(_HTTP2_PREFACE)
    header = b""
    while len(header) < 9:
        chunk = conn.recv(9 - len(header))  # the socket's timeout bounds each wait: TimeoutError, an OSError
        if not chunk:
            return False
        header += chunk
    return header[3] == 4


@contextmanager
def ray_session(address: str | None, **init_kwargs):
    """Ray for one job: reused when this process has initialised it already; else connected to `address`, else
    RAY_ADDRESS (checked first: an unreachable or refusing head fails within seconds, naming it), else a private
    local instance ("local": never someone else's cluster by accident), shut down at the end. A local instance is
    guarded by odis.pipelines.ray_watchdog, so a driver killed with SIGKILL leaves no Ray process behind."""
    import ray

    if ray.is_initialized():
        yield
        return
    if not address and not os.environ.get("RAY_ADDRESS"):
        address = "local"
    check_ray_address(address)
    if address == "local":
        init_kwargs.setdefault("include_dashboard", False)
    try:
        ray.init(address=address, **init_kwargs)
    except ConnectionError as e:  # e.g. "auto" with no running cluster
        source = _source(address)
        raise RayAddressError(f"{source[0] if source else 'ray.init'}: {e}") from None
    guard = None
    try:
        if address == "local":
            from odis.pipelines.ray_watchdog import RayWatchdog

            guard = RayWatchdog.start()
        yield
    finally:
        ray.shutdown()
        if guard is not None:
            guard.release()
