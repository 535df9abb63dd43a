"""Connecting the Ray jobs (extract-boxes, shard) to a cluster without waiting forever.

`ray.init(address="HOST:PORT")` has no connection timeout: with nothing listening there, or a server that is not
Ray's, it retries for as long as it runs. So an explicit address (`--ray-address`, else `RAY_ADDRESS`) must first
take a TCP connection and answer the gRPC (HTTP/2) handshake within a few seconds, and a failure is one line
naming the address.
"""
from __future__ import annotations

import os
import socket
import sys
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
    answers gRPC's HTTP/2 handshake within `timeout` seconds: "HOST:PORT" is the head's GCS port,
    "ray://HOST[:PORT]" its Ray Client port. No
    address, "local" and "auto" start or find a local runtime (ray.init fails fast by itself there); other
    schemes are left to ray.init. Nothing is checked when this process has initialised Ray already (it is reused)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return
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


def init_ray(address: str | None, **kwargs) -> bool:
    """ray.init(address=address, **kwargs) unless Ray is already initialised in this process (then it is reused);
    an explicit address is checked first. Returns True if this call connected or started Ray (the caller shuts it
    down)."""
    import ray

    if ray.is_initialized():
        return False
    check_ray_address(address)
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:  # e.g. "auto" with no running cluster
        source = _source(address)
        raise RayAddressError(f"{source[0] if source else 'ray.init'}: {e}") from None
    return True
