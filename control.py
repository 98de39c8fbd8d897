"""The control socket's protocol, shared by the supervisor (which serves it) and the operator CLI
(which calls it): where the key is kept, the framing - `multiprocessing.connection` with its
HMAC handshake - and one JSON request answered by one JSON reply.

Standard library only and nothing heavy, so an operator command starts in tens of milliseconds.
"""

from __future__ import annotations

import json
import multiprocessing.connection as mpc
import os
from pathlib import Path
from typing import Any

KEY_FILE = "dims.key"


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
    mpc.AuthenticationError on a wrong key, TimeoutError when no reply comes in time.
    """
    conn = mpc.Client(str(socket_path), family="AF_UNIX", authkey=authkey)
    try:
        conn.send_bytes(json.dumps(payload).encode())
        if not conn.poll(timeout):
            raise TimeoutError(f"the supervisor did not answer within {timeout:g} s")
        return json.loads(conn.recv_bytes())
    finally:
        conn.close()
