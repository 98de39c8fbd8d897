"""The control socket's protocol, shared by the supervisor (which serves it) and the operator CLI
(which calls it): where the key is kept, the framing - `multiprocessing.connection` with its
HMAC handshake - and one JSON request answered by one JSON reply.

Standard library only and nothing heavy, so an operator command starts in tens of milliseconds.
"""

from __future__ import annotations

import json
import multiprocessing.connection as mpc
import os
import socket
import struct
from pathlib import Path
from typing import Any

KEY_FILE = "dims.key"
HANDSHAKE_TIMEOUT = 5.0   # seconds for the connect and for each read or write on the connection
CACHE_FIELDS = ("hits", "misses", "hit_rate", "entries", "evictions", "invalidations")   # per bot in cache_stats


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


def request(socket_path: Path, authkey: bytes, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One request to a supervisor's control socket; its reply envelope
    (`{"status": "ok", ...}` or `{"status": "error", "reason": ...}`).

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
        deadline = struct.pack("ll", int(HANDSHAKE_TIMEOUT), int(HANDSHAKE_TIMEOUT % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, deadline)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, deadline)
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
