"""Servers as child processes: ``valuerank serve`` (demo, overload runs) and the canned transport baseline.

Each is started with ``--port 0`` and is ready once it prints ``serving on HOST:PORT`` (the real
server does so when its health turns SERVING); ``stop`` sends SIGTERM, so the server drains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


class ServerProcess:
    def __init__(self, proc: subprocess.Popen[str], target: str) -> None:
        self.proc = proc
        self.target = target
        self.exit_code: int | None = None

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.exit_code = self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_serve(
    model_dir: Path, index_dir: Path, flags: Sequence[str] = (), timeout_s: float = 120.0
) -> ServerProcess:
    """``valuerank serve --model DIR --index DIR --port 0 FLAGS...``, once it is SERVING."""
    module = "serving.commands.serve"  # `valuerank serve`, without the CLI's table of commands
    args = ["--model", str(model_dir), "--index", str(index_dir), "--port", "0", *flags]
    return start_module(module, args, timeout_s)


def start_canned(k: int = 10, timeout_s: float = 60.0) -> ServerProcess:
    """The bare ``grpc.aio`` server with a canned response of ``k`` items (``serving.edge.canned``)."""
    return start_module("serving.edge.canned", ["--port", "0", "--k", str(k)], timeout_s)


def start_module(module: str, args: Sequence[str], timeout_s: float) -> ServerProcess:
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{module} exited before serving (code {proc.wait()})")
        if line.startswith("serving on "):
            return ServerProcess(proc, line.split()[-1])
    proc.kill()
    raise RuntimeError(f"{module} did not become ready in {timeout_s:.0f} s")
