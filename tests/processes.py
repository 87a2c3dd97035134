"""Real ``eddy serve`` processes for tests: :class:`EddyProcess`, and a free port to give one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support import SECRET

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EddyProcess:
    """``python -m service serve`` in a subprocess, logs captured to a file."""

    def __init__(self, tmp_path: Path, storage: str, *, secret: str | None = SECRET, args: list[str] = (),
                 cwd: Path | None = None, env: dict[str, str] | None = None, port: int | None = None,
                 cpus: set[int] | None = None) -> None:
        self.port = port or free_port()
        self.log_path = tmp_path / f"eddy-{self.port}.log"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("EDDY_")}
        environment["PYTHONPATH"] = str(ROOT)
        if secret:
            environment["EDDY_JWT_SECRET"] = secret
        environment.update(env or {})
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(self.port), "--address", "127.0.0.1",
             "--storage", storage, *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=environment, cwd=cwd or tmp_path,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,  # as `taskset -c` would
        )

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"eddy exited: {self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                    if b" 200 " in sock.recv(100):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"eddy not ready: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log.close()

    def workers(self) -> list[int]:
        """Pids of the processes forked by ``--processes``."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]
