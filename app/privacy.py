"""The network guard: an audit hook that refuses and counts non-loopback connections."""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)

_GUARDED_EVENTS = ("socket.connect", "socket.sendto", "socket.getaddrinfo")


class NetworkRefused(PermissionError):
    """Raised inside the caller of a refused connect: Quire never talks to the network."""


def is_loopback_host(host: object) -> bool:
    """True for loopback addresses and names; False for anything that could leave the box."""
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    if host.lower() in ("localhost", "localhost.localdomain", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class NetworkGuard:
    """Counts refused attempts; `check` is the audit-hook body and is testable on its own."""

    _installed: NetworkGuard | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.attempts: list[str] = []

    @property
    def num_attempts(self) -> int:
        with self._lock:
            return len(self.attempts)

    def check(self, event: str, args: tuple[Any, ...]) -> None:
        if event not in _GUARDED_EVENTS:
            return
        target = self._target(event, args)
        if target is None:
            return
        with self._lock:
            self.attempts.append(f"{event} {target}")
        log.warning("refused network access: %s %s", event, target)
        raise NetworkRefused(f"Quire is offline: refused {event} to {target}")

    @staticmethod
    def _target(event: str, args: tuple[Any, ...]) -> str | None:
        """The non-loopback destination of an event, or None when it is local."""
        if event == "socket.getaddrinfo":
            host = args[0] if args else None
            return None if is_loopback_host(host) else str(host)
        sock, address = args[0], args[1]
        family = getattr(sock, "family", None)
        if family is not None and family not in (socket.AF_INET, socket.AF_INET6):
            return None  # AF_UNIX and friends stay on the machine
        host = address[0] if isinstance(address, tuple) and address else address
        return None if is_loopback_host(host) else f"{host}:{address[1]}"

    def install(self) -> NetworkGuard:
        """Install this guard as a process-wide audit hook (once; hooks cannot be removed)."""
        if NetworkGuard._installed is None:
            sys.addaudithook(self.check)
            NetworkGuard._installed = self
        return NetworkGuard._installed
