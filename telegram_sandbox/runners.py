"""Running the sandbox: in this thread (run_server, the command line's default), in a
background thread (Sandbox) or in a child process (SandboxProcess).

Sandbox and SandboxProcess are SandboxClients for the server they start and context managers;
tests use Sandbox, the offline demo (main.py) and the benchmarks use SandboxProcess, which runs
`python -m telegram_sandbox` and reads the URL from the banner, its first line of output.

Imports client, spec, core and http_server; nothing imports it but the command line and the
package's lazy names.
"""

import asyncio
import ipaddress
import logging
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading

from .client import SandboxClient
from .core import SandboxCore
from .http_server import SandboxServer
from .spec import Spec

LOG = logging.getLogger(__name__)

PACKAGE_PARENT = pathlib.Path(__file__).resolve().parent.parent


def banner(url: str) -> str:
    """The first line a serving sandbox prints; SandboxProcess reads the URL from it."""
    return f"Telegram sandbox listening on {url} (Bot API root: {url}/bot)"


def url_for(host: str, port: int) -> str:
    """The sandbox's base URL for a listening address (IPv6 hosts in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(host: str, port: int, stop: asyncio.Event, ready=None) -> None:
    """Runs the sandbox until stop is set; ready(url) is called once it listens."""
    server = SandboxServer(SandboxCore(Spec.load()), host, port)
    port = await server.start()
    url = url_for(host, port)
    LOG.info("listening on %s", url)
    if ready is not None:
        ready(url)
    try:
        await stop.wait()
    finally:
        await server.close()


def run_server(host: str, port: int, exit_with_stdin: bool = False) -> int:
    """Serves until SIGINT or SIGTERM (or, with exit_with_stdin, until stdin closes);
    prints the URL as the first line of stdout."""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        LOG.warning("listening on %s: the sandbox is reachable from other machines", host)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if exit_with_stdin:
            stdin = sys.stdin.fileno()
            loop.add_reader(stdin, lambda: os.read(stdin, 4096) or stop.set())
        await serve(host, port, stop, ready=lambda url: print(banner(url), flush=True))

    try:
        asyncio.run(main())
    except OSError as err:
        print(f"telegram_sandbox: cannot listen on {host}:{port}: {err.strerror}",
              file=sys.stderr)
        return 1
    return 0


class Sandbox(SandboxClient):
    """The sandbox in a background thread with its own event loop; a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
        super().__init__(url_for(host, port), timeout)
        self.host, self.port = host, port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None

    def start(self, timeout: float = 10.0) -> "Sandbox":
        self._thread = threading.Thread(target=self._run, name="telegram-sandbox", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"sandbox did not start within {timeout} s")
        if self._failure is not None:
            raise RuntimeError(f"sandbox failed to start: {self._failure}") from self._failure
        return self

    def close(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)

    def __enter__(self) -> "Sandbox":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:  # reported to start(), which re-raises it
            self._failure = err
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await serve(self.host, self.port, self._stop, ready=self._ready)

    def _ready(self, url: str) -> None:
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self._started.set()


class SandboxProcess(SandboxClient):
    """`python -m telegram_sandbox` in a child process (no GIL shared); a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0,
                 log_level: str = "WARNING"):
        super().__init__(url_for(host, port), timeout)
        self.host, self.port, self.log_level = host, port, log_level
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "SandboxProcess":
        command = [sys.executable, "-m", "telegram_sandbox", "--host", self.host,
                   "--port", str(self.port), "--log-level", self.log_level, "--exit-with-stdin"]
        # Started in the package's parent directory, so `-m` finds this very package first.
        # Its own session: a Ctrl-C meant for the parent does not cut the sandbox away from
        # bots that are still stopping; it ends when the parent stops it or dies (stdin EOF).
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, cwd=PACKAGE_PARENT, start_new_session=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.process.stdout.readline()),
                         daemon=True).start()
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise RuntimeError(f"sandbox process printed no URL within {timeout} s") from None
        match = re.search(r"listening on (http://\S+)", line)
        if match is None:
            self.close()
            raise RuntimeError(f"sandbox process did not start: {line.strip() or 'no output'}")
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def close(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)
        self.process.stdout.close()
        self.process.stdin.close()

    def __enter__(self) -> "SandboxProcess":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()
