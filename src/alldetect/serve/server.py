"""The HTTP server around the app: uvicorn with the connection rules of ``connections``, listening on both
IPv4 and IPv6 when bound to ``::``."""

from __future__ import annotations

import logging
import socket

import uvicorn
from fastapi import FastAPI

from ..errors import AlldetectError
from .connections import ConnectionLimits, guarded_protocol

logger = logging.getLogger(__name__)


def make_server(app: FastAPI, host: str, port: int, limits: ConnectionLimits | None = None, *,
                log_level: str = "info") -> tuple[uvicorn.Server, list[socket.socket] | None]:
    """A uvicorn server for ``app`` and, for ``::``, the dual-stack socket it must be run on
    (``server.run(sockets=...)``); None lets uvicorn bind ``host`` itself."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            http=guarded_protocol(limits or ConnectionLimits()),
                            timeout_keep_alive=5)
    return uvicorn.Server(config), ([dual_stack_socket(port)] if host == "::" else None)


def dual_stack_socket(port: int) -> socket.socket:
    """A listening socket on every IPv6 and IPv4 address (asyncio binds ``::`` to IPv6 only)."""
    if not socket.has_ipv6:
        raise AlldetectError("--host ::: this Python has no IPv6; bind 0.0.0.0 for every IPv4 address")
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:
            logger.warning("this system cannot serve IPv4 on an IPv6 socket: listening on IPv6 addresses only; "
                           "bind 0.0.0.0 for IPv4")
        sock.bind(("::", port))
    except OSError as e:
        sock.close()
        raise AlldetectError(f"cannot listen on [::]:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock
