"""The network guard refuses and counts non-loopback connections (audit hook)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from app.privacy import NetworkGuard, NetworkRefused, is_loopback_host
from app.widgets.settings_dialog import PrivacyPanel

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.8.9.1", None])
def test_loopback_hosts(host: object) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["10.0.0.1", "8.8.8.8", "example.org", "2001:db8::1", 42])
def test_other_hosts_are_not_loopback(host: object) -> None:
    assert not is_loopback_host(host)


def test_check_counts_and_refuses_without_installing() -> None:
    guard = NetworkGuard()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        guard.check("socket.connect", (sock, ("127.0.0.1", 80)))
        assert guard.num_attempts == 0
        with pytest.raises(NetworkRefused):
            guard.check("socket.connect", (sock, ("93.184.216.34", 443)))
        with pytest.raises(NetworkRefused):
            guard.check("socket.getaddrinfo", ("example.org", 443, 0, 0, 0))
        guard.check("open", ("/etc/hosts", "r", 0))
    finally:
        sock.close()
    assert guard.num_attempts == 2
    assert guard.attempts[0] == "socket.connect 93.184.216.34:443"


HOOKED = textwrap.dedent("""
    import socket
    from app.privacy import NetworkGuard, NetworkRefused
    guard = NetworkGuard().install()
    assert NetworkGuard().install() is guard  # installs once
    server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)
    local = socket.create_connection(server.getsockname(), timeout=5)  # loopback is fine
    local.close(); server.close()
    outside = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    outside.settimeout(0.5)
    try:
        outside.connect(("203.0.113.7", 9))
    except NetworkRefused:
        print("refused")
    print("attempts", guard.num_attempts)
""")


def test_installed_hook_refuses_a_real_connect() -> None:
    result = subprocess.run(
        [sys.executable, "-c", HOOKED], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["refused", "attempts", "1"]


def test_privacy_panel_reads_zero_then_counts(qtbot: Any) -> None:
    guard = NetworkGuard()
    panel = PrivacyPanel(guard)
    qtbot.add_widget(panel)
    assert "since start: 0" in panel.count_label.text()
    with pytest.raises(NetworkRefused):
        guard.check("socket.getaddrinfo", ("telemetry.example", 443))
    panel = PrivacyPanel(guard)
    qtbot.add_widget(panel)
    assert "since start: 1" in panel.count_label.text()
    assert panel.attempts.count() == 1
