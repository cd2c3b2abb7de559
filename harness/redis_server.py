"""A real redis-server on a loopback port, started and stopped by the tests and benchmarks that need one.

:func:`redis_missing` says why none can be started here (no ``redis-server`` binary, no ``redis``
client); ``tests/conftest.py``'s ``redis_server`` fixture skips with that reason, or fails in CI.
The server keeps nothing on disk (no RDB, no AOF) and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = ["PREFIX", "RedisServer", "redis_missing"]

#: The prefix of every name the remote store writes (RedisStore's default).
PREFIX = "torch_trt_module:"


def redis_missing() -> str | None:
    """Why no Redis server can be started here, or None."""
    if shutil.which("redis-server") is None:
        return "no redis-server binary (apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError as e:
        return f"the redis client is not installed ({e})"
    return None


class RedisServer:
    """``redis-server`` on a free loopback port, answering PING before the constructor returns."""

    def __init__(self, tmp: str | Path, *, start_timeout_s: float = 10.0) -> None:
        import redis

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
             "--save", "", "--appendonly", "no", "--dir", str(tmp), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client: Any = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if self.client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {start_timeout_s:g} s")

    def entries(self) -> list[bytes]:
        """The names of the engine entries stored, sorted."""
        return sorted(self.client.keys(PREFIX + "entry-*"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
