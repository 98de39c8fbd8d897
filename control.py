"""The control socket: the protocol between the operator CLI and the supervisor, both halves of
it, and the table of its commands with their arguments and reply fields.

- Where the key is kept (`{data_dir}/dims.key`, mode 0600) and the framing:
  `multiprocessing.connection` on an AF_UNIX socket (mode 0600) with its HMAC handshake, then one
  JSON request answered by one JSON reply, `{"status": "ok", ...}` or
  `{"status": "error", "reason": ..., "code": ...}`.
- The client half, `request()`, used by the CLI (and the tests): deadlines on the connect, the
  handshake and the reply.
- The server half, `ControlServer`, used by the supervisor: a thread accepts clients, checks each
  request against `COMMANDS` (an unknown command or a bad argument is answered at once, with
  `code` BAD_REQUEST), and hands the rest to the supervisor's loop through a queue and a wake-up
  call. A client that fails the handshake, stalls or sends garbage is dropped; the loop never
  waits on a client. `claim()` binds the socket, refusing one a live supervisor answers on.

Imports the standard library only, and only light parts at the top (an operator command starts
in tens of milliseconds): the server's threads and queue are imported by the server.
"""

from __future__ import annotations

import json
import multiprocessing.connection as mpc
import os
import socket
import struct
from pathlib import Path
from typing import Any, Callable, NamedTuple

KEY_FILE = "dims.key"
HANDSHAKE_TIMEOUT = 5.0    # seconds for the connect, the handshake, and a client to send its request
REQUEST_MAX_BYTES = 1 << 20
MAX_CLIENTS = 16           # connections served at once; more are closed at once
BAD_REQUEST = 2            # a reply's "code" for a request naming no such command, bot or state (the CLI's usage status)

# What one bot looks like in bot_list, bot_start/stop/restart and wait replies.
BOT_FIELDS = ("name", "state", "pid", "uptime_s", "restarts", "operator_restarts", "heartbeat_age_s",
              "updates_handled", "backlog", "last_error", "problem", "wanted")
CACHE_FIELDS = ("hits", "misses", "hit_rate", "entries", "evictions", "invalidations")   # per bot in cache_stats


class ControlCommand(NamedTuple):
    """One command of the control socket: its arguments (beside "command" and "timeout") and
    the fields of its "ok" reply (beside "status")."""
    help: str
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    reply: tuple[str, ...] = ()


COMMANDS: dict[str, ControlCommand] = {
    "ping": ControlCommand("is a supervisor answering here?", reply=("pid", "uptime_s")),
    "bot_list": ControlCommand("every bot's row", reply=("supervisor", "heartbeat_timeout_s", "bots")),
    "bot_start": ControlCommand("start a bot; answer once it is RUNNING", ("name",), reply=("bot", "changed")),
    "bot_stop": ControlCommand("stop a bot; answer once it is STOPPED", ("name",), reply=("bot", "changed")),
    "bot_restart": ControlCommand("restart a bot; answer once it is RUNNING again", ("name",),
                                  reply=("bot", "changed")),
    "wait": ControlCommand("answer once the bot is in one of `states`", ("name", "states"), reply=("bot", "changed")),
    "reload": ControlCommand("re-read the configuration", reply=("added", "removed", "changed")),
    "cache_stats": ControlCommand("each bot's roster cache figures, fresh from the bot", optional=("name",),
                                  reply=("bots",)),
    "stats": ControlCommand("each bot's heartbeat figures, fresh from the bot", optional=("name",), reply=("bots",)),
    "inbox_wake": ControlCommand("tell a RUNNING bot to handle its pending inbox updates now (after inbox_retry); "
                                 "`woken` is false for a bot that is not running", ("name",), reply=("bot", "woken")),
}
_ARGUMENT_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str, type(None)), "states": (list,), "timeout": (int, float),
}


def check_request(payload: Any) -> str | None:
    """What is wrong with a request, or None when the supervisor should answer it."""
    if not isinstance(payload, dict):
        return "a request is a JSON object"
    name = payload.get("command")
    command = COMMANDS.get(name) if isinstance(name, str) else None
    if command is None:
        return f"unknown command {name!r} (known: {', '.join(COMMANDS)})"
    missing = [arg for arg in command.required if arg not in payload]
    if missing:
        return f"{name}: missing {', '.join(missing)}"
    for arg in (*command.required, *command.optional, "timeout"):
        if arg in payload and (isinstance(payload[arg], bool) or not isinstance(payload[arg], _ARGUMENT_TYPES[arg])):
            return f"{name}: {arg} has the wrong type ({type(payload[arg]).__name__})"
    if isinstance(payload.get("timeout"), (int, float)) and not 0 <= payload["timeout"] <= 86400:
        return f"{name}: timeout must be between 0 and 86400 seconds"
    return None


# --------------------------------------------------------------------------- the key


def read_authkey(data_dir: Path) -> bytes | None:
    """The supervisor's key, or None when there is none (or it cannot be read)."""
    try:
        return (Path(data_dir) / KEY_FILE).read_bytes().strip() or None
    except OSError:
        return None


def make_authkey(data_dir: Path) -> bytes:
    """The key, created (mode 0600) when missing."""
    key = read_authkey(data_dir)
    if key:
        return key
    fd = os.open(Path(data_dir) / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(os.urandom(32).hex())   # what secrets.token_hex(32) does, without its imports
    return read_authkey(data_dir)


# --------------------------------------------------------------------------- the client


def request(socket_path: Path, authkey: bytes, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One request to a supervisor's control socket; its reply envelope.

    Raises OSError (ConnectionRefusedError, FileNotFoundError) when nobody listens,
    mpc.AuthenticationError on a wrong key, TimeoutError when the handshake or the reply does
    not come in time.
    """
    conn = _connect(Path(socket_path), authkey)
    try:
        conn.send_bytes(json.dumps(payload).encode())
        if not conn.poll(timeout):
            raise TimeoutError(f"the supervisor did not answer within {timeout:g} s")
        return json.loads(conn.recv_bytes())
    finally:
        conn.close()


def _connect(path: Path, authkey: bytes) -> mpc.Connection:
    """What `mpc.Client` does (connect, then the HMAC handshake), with a deadline on every read
    and write: a supervisor that accepts connections but is stopped or hung fails the call with
    TimeoutError instead of hanging it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        sock.connect(str(path))
        sock.settimeout(None)   # blocking again, as mpc.Connection needs, with the kernel's deadlines:
        _deadlines(sock, HANDSHAKE_TIMEOUT)
        conn = mpc.Connection(sock.detach())
    try:
        mpc.answer_challenge(conn, authkey)
        mpc.deliver_challenge(conn, authkey)
    except BlockingIOError:   # a read or write hit the deadline
        conn.close()
        raise TimeoutError(f"{path} accepted the connection but no handshake came within "
                           f"{HANDSHAKE_TIMEOUT:g} s") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _deadlines(sock: socket.socket, seconds: float) -> None:
    """Kernel deadlines on each read and write of a blocking socket (EAGAIN when one passes)."""
    value = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


# --------------------------------------------------------------------------- the server


class SocketInUse(Exception):
    """A live process answers on the control socket; the message says which and what to do."""


def claim(path: Path, authkey: bytes, wake: Callable[[], None], log) -> "ControlServer":
    """Bind the control socket, removing a stale one (nobody listens on it). A socket that answers
    with another key, or accepts and then stalls or hangs up, belongs to a live process: refuse
    (SocketInUse) and touch nothing."""
    elsewhere = "stop it first, or point DIMS_SOCKET elsewhere"
    if path.exists():
        try:
            answer = request(path, authkey, {"command": "ping"}, timeout=3)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing the stale control socket %s", path)
            path.unlink(missing_ok=True)
        except mpc.AuthenticationError:
            raise SocketInUse(f"another supervisor, with another data directory (its own key), is running "
                              f"on {path}; {elsewhere}") from None
        except (OSError, EOFError) as exc:
            raise SocketInUse(f"something listens on {path} but does not answer as a supervisor "
                              f"({str(exc) or type(exc).__name__}); {elsewhere}") from None
        else:
            raise SocketInUse(f"another supervisor is running (pid {answer.get('pid')}) on {path}; {elsewhere}")
    return ControlServer(path, authkey, wake, log)


class ControlServer:
    """Accepts CLI connections and queues their checked requests as (payload, reply) pairs in
    `requests`; the supervisor's loop answers each with `reply(dict)` (from any thread)."""

    def __init__(self, path: Path, authkey: bytes, wake: Callable[[], None], log):
        import queue
        import threading
        self._queue_module, self._threading = queue, threading
        self.path, self.authkey, self.wake, self.log = path, authkey, wake, log
        self.requests: queue.Queue = queue.Queue()
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._sock.bind(str(path))
        except BaseException:
            self._sock.close()
            raise
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._sock.listen(32)
        self._closed = False
        threading.Thread(target=self._accept_loop, name="control-accept", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                client.close()
                continue
            self._threading.Thread(target=self._serve_client, args=(client,), name="control-client",
                                   daemon=True).start()

    def _serve_client(self, client: socket.socket) -> None:
        # The handshake and the request must arrive within HANDSHAKE_TIMEOUT in all (a client
        # dripping a byte at a time included): past it the socket is shut down under the reads.
        watchdog = self._threading.Timer(HANDSHAKE_TIMEOUT, _shutdown, args=(client,))
        watchdog.start()
        conn = mpc.Connection(os.dup(client.fileno()))
        try:
            mpc.deliver_challenge(conn, self.authkey)
            mpc.answer_challenge(conn, self.authkey)
            payload = json.loads(conn.recv_bytes(REQUEST_MAX_BYTES))
            watchdog.cancel()
            problem = check_request(payload)
            if problem is not None:
                answer = {"status": "error", "reason": problem, "code": BAD_REQUEST}
            else:
                reply: Any = self._queue_module.Queue(maxsize=1)
                self.requests.put((payload, reply.put))
                self.wake()
                answer = reply.get(timeout=float(payload.get("timeout", 30)) + 5)
            _deadlines(client, HANDSHAKE_TIMEOUT)   # a client that does not read its reply goes too
            conn.send_bytes(json.dumps(answer, default=str).encode())
        except mpc.AuthenticationError:
            self.log.warning("control socket: a client failed the handshake and was dropped")
        except (EOFError, OSError, ValueError, TypeError, RecursionError, self._queue_module.Empty) as exc:
            self.log.warning("control socket: dropped a client (%s)", type(exc).__name__)
        finally:
            watchdog.cancel()
            conn.close()
            client.close()
            self._slots.release()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
