"""Start and stop real server processes (kai nodes, memcached) for system tests and benchmarks.

Every wait has a deadline and polls a condition (the server answers ``version``); nothing here
sleeps blindly. Processes are always reaped: use the classes as context managers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def memcache_version(host: str, port: int, *, timeout: float = 1.0) -> str | None:
    """The server's ``version`` reply, or None if it does not answer in time."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"version\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(256)
                if not chunk:
                    return None
                reply += chunk
    except OSError:
        return None
    if not reply.startswith(b"VERSION "):
        return None
    return reply[8:-2].decode("ascii", "replace")


class ServerProcess:
    """A child process that serves the memcached protocol on ``host:port``."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        host: str,
        port: int,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.argv = list(argv)
        #: An argv prefix the process runs under, say ``["ip", "netns", "exec", "ns1"]``.
        self.wrapper = list(wrapper)
        self.host = host
        self.port = port
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        """The child's process id (it must be running)."""
        assert self.process is not None, "not started"
        return self.process.pid

    def start(self, *, timeout: float = 30.0) -> None:
        """Spawn the process and wait until it answers ``version`` (or raise)."""
        if self.log_path is not None:
            self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.wrapper, *self.argv],
            stdin=subprocess.DEVNULL,
            stdout=self._log if self._log is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if self._log is not None else subprocess.DEVNULL,
            env=self.env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.argv[0]} exited with {self.process.returncode} before serving; "
                    f"see {self.log_path}"
                )
            if memcache_version(self.host, self.port, timeout=0.5) is not None:
                return
            time.sleep(0.02)  # poll interval of a deadline-bounded wait, not a settle delay
        self.stop()
        raise TimeoutError(f"{self.argv} did not answer on {self.host}:{self.port} in {timeout}s")

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def kill(self) -> None:
        """``kill -9`` the process and reap it."""
        if self.process is not None:
            self.signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, *, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class KaiProcess(ServerProcess):
    """A ``kai`` node run as ``python -m kai`` with its own data directory and ports."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        rpc_port: int | None = None,
        host: str = "127.0.0.1",
        config: str | None = None,
        extra_args: Sequence[str] = (),
        wrapper: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.rpc_port = rpc_port if rpc_port is not None else free_port(host)
        port = port if port is not None else free_port(host)
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "kai",
            "--data-dir",
            str(data_dir),
            "--listen",
            f"{host}:{port}",
            "--rpc",
            f"{host}:{self.rpc_port}",
        ]
        if config is not None:
            config_path = data_dir.parent / f"{data_dir.name}.toml"
            config_path.write_text(config)
            argv += ["--config", str(config_path)]
        argv += list(extra_args)
        super().__init__(
            argv,
            host=host,
            port=port,
            log_path=data_dir.parent / f"{data_dir.name}.log",
            wrapper=wrapper,
        )

    def log_text(self) -> str:
        """Everything the node logged so far."""
        assert self.log_path is not None
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")
        return ""


class MemcachedProcess(ServerProcess):
    """A real ``memcached`` (Debian package) for side-by-side runs. ``-t 1`` by default."""

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        threads: int = 1,
        memory_mb: int = 1024,
        max_connections: int = 4096,
    ) -> None:
        binary = shutil.which("memcached") or "/usr/bin/memcached"
        port = port if port is not None else free_port(host)
        argv = [
            binary,
            "-l",
            host,
            "-p",
            str(port),
            "-U",
            "0",
            "-t",
            str(threads),
            "-m",
            str(memory_mb),
            "-c",
            str(max_connections),
        ]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        super().__init__(argv, host=host, port=port)

    @staticmethod
    def available() -> bool:
        """Whether a memcached binary is installed."""
        return shutil.which("memcached") is not None or Path("/usr/bin/memcached").exists()
