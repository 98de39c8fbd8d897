"""What every benchmark here uses: a keep-alive HTTP/1.1 client connection for the load
generators (small enough not to be the bottleneck it measures: no http.client per request, no
thread) and readers of /proc. Standard library only."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib


class _BufferedStreamProtocol(asyncio.StreamReaderProtocol, asyncio.BufferedProtocol):
    """asyncio's stream protocol reading into one buffer per connection. By default asyncio
    allocates 256 KiB for every read, which glibc's malloc may hand back to the system and fault
    in again on every response: the load generator, not the server, then sets the pace."""

    def __init__(self, reader: asyncio.StreamReader):
        super().__init__(reader)
        self._buffer = memoryview(bytearray(64 * 1024))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._buffer[:nbytes])  # the reader copies it into its own


async def _open_connection(host: str,
                           port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio.open_connection(host, port), reading through _BufferedStreamProtocol."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, protocol = await loop.create_connection(
        lambda: _BufferedStreamProtocol(reader), host, port)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class Connection:
    """One keep-alive connection; `request()` sends one request and reads its JSON answer."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      content_type: str = "application/json") -> tuple[int, dict]:
        """(status, JSON body)."""
        if self.writer is None:
            self.reader, self.writer = await _open_connection(self.host, self.port)
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readuntil(b"\r\n")
        headers = await self.reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in headers.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return int(status_line.split()[1]), json.loads(await self.reader.readexactly(length))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on, or None when the process is gone."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process, None when it is gone."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else None
