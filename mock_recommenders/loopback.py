"""Loopback sockets on ports the system picks, for the servers tests and benchmarks start.

Binding here and handing the socket over (gunicorn's ``--bind fd://N``, nginx's ``NGINX``)
leaves no moment between choosing a port and using it in which another process could take it.
"""

from __future__ import annotations

import socket

__all__ = ["loopback_socket", "port_of"]


def loopback_socket() -> socket.socket:
    """A TCP socket bound to a free port on 127.0.0.1, not yet listening."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
    except BaseException:
        sock.close()
        raise
    return sock


def port_of(sock: socket.socket) -> int:
    """The port `sock` is bound to."""
    port: int = sock.getsockname()[1]
    return port
