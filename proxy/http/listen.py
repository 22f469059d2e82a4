"""Listening sockets, bound before anything else starts: a busy or impossible address is
one clear error naming the config key (``listen: cannot listen on 127.0.0.1:5000 (address
already in use)``), and nothing (cache, webhook, watchers) was opened that must be undone.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from proxy.errors import PullgateError


class ListenFailed(PullgateError):
    """A listener could not bind its address (in use, not on this machine, privileged)."""

    def __init__(self, key: str, host: str, port: int, exc: OSError) -> None:
        self.key, self.address = key, f"{host}:{port}"
        self.reason = (exc.strerror or exc.__class__.__name__).lower()
        super().__init__(f"{key}: cannot listen on {self.address} ({self.reason})")


async def bind(key: str, host: str, port: int) -> list[socket.socket]:
    """Bound (not yet listening) sockets for every address ``host`` resolves to, as
    ``loop.create_server`` would make them; ``ListenFailed`` naming ``key`` otherwise."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ListenFailed(key, host, port, exc) from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart over TIME_WAIT
            if family == socket.AF_INET6:
                # One socket per family, as asyncio does: no dual-stack surprises.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ListenFailed(key, host, port, exc) from None
    return sockets


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()
