"""The sandbox's HTTP/1.1 server: asyncio streams, keep-alive and pipelining in order.

read_request parses a request (Content-Length or chunked bodies, Expect: 100-continue);
parse_form turns query strings, form, JSON and multipart bodies into the Bot API's raw text
values (files as Upload); SandboxServer routes /bot{token}/{method} and /file/bot{token}/{path}
to the core's Bot API and /sandbox/* to its user side, and answers JSON; a request whose
client goes away is cancelled. The runners start it.

Imports constants, errors, media and core; never the client, the runners or the chat. Its logs
name a bot by its id, never by its token.
"""

import asyncio
import dataclasses
import json
import logging
import re
import urllib.parse

from .constants import bot_id_of
from .core import SandboxCore, UserError
from .errors import ApiError, status_phrase
from .media import Upload

LOG = logging.getLogger(__name__)

MAX_BODY_BYTES = 50 * 1024 * 1024


@dataclasses.dataclass
class Request:
    method: str
    path: str
    version: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return connection == "keep-alive"
        return connection != "close"


class HttpError(Exception):
    """A request the server cannot parse; answered with status and the connection closed."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status


async def read_request(reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> Request | None:
    """The next request on a connection, or None when the client closed it cleanly."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as err:
        if err.partial.strip():
            raise HttpError(400, "truncated request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise HttpError(431, "request head too large") from None
    lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "malformed request line")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = await _read_body(reader, headers)
    target = urllib.parse.urlsplit(parts[1])
    query = dict(urllib.parse.parse_qsl(target.query, keep_blank_values=True))
    return Request(parts[0].upper(), urllib.parse.unquote(target.path), parts[2], query,
                   headers, body)


async def _read_body(reader: asyncio.StreamReader, headers: dict) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader)
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HttpError(400, "bad Content-Length") from None
    if length > MAX_BODY_BYTES:
        raise HttpError(413, "request body too large")
    try:
        return await reader.readexactly(length) if length > 0 else b""
    except asyncio.IncompleteReadError:
        raise HttpError(400, "truncated request body") from None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks, total = [], 0
    try:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise HttpError(413, "request body too large")
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        raise HttpError(400, "malformed chunked body") from None


def parse_form(request: Request) -> dict:
    """Bot API parameters from the query string and any body, as Telegram's text values."""
    params: dict = dict(request.query)
    content_type = request.headers.get("content-type", "").lower()
    if not request.body:
        return params
    if content_type.startswith("application/json"):
        try:
            decoded = json.loads(request.body)
        except (ValueError, RecursionError):
            raise ApiError(400, "Bad Request: can't parse JSON object") from None
        if not isinstance(decoded, dict):
            raise ApiError(400, "Bad Request: JSON object expected")
        params.update({key: value if isinstance(value, str) else json.dumps(value)
                       for key, value in decoded.items() if value is not None})
    elif content_type.startswith("multipart/form-data"):
        params.update(parse_multipart(request.body, request.headers["content-type"]))
    else:
        try:
            text = request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "Bad Request: request body is not UTF-8") from None
        params.update(urllib.parse.parse_qsl(text, keep_blank_values=True))
    return params


BOUNDARY_RE = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
DISPOSITION_PARAM_RE = re.compile(r';\s*([\w*]+)="((?:[^"\\]|\\.)*)"|;\s*([\w*]+)=([^;]*)')


def parse_multipart(body: bytes, content_type: str) -> dict:
    """Fields of a multipart/form-data body: text as str, files as Upload."""
    match = BOUNDARY_RE.search(content_type)
    if match is None:
        raise ApiError(400, "Bad Request: multipart body without boundary")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1")
    fields: dict = {}
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        head, _, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        disposition = {
            (m.group(1) or m.group(3)).lower(): (m.group(2) if m.group(1) else m.group(4).strip())
            for m in DISPOSITION_PARAM_RE.finditer(headers.get("content-disposition", ""))}
        content = content.removesuffix(b"\r\n")
        if "name" not in disposition:
            continue
        if "filename" in disposition:
            fields[disposition["name"]] = Upload(
                disposition["filename"], headers.get("content-type", "application/octet-stream"),
                content)
        else:
            fields[disposition["name"]] = content.decode("utf-8", "replace")
    return fields


def encode_response(status: int, body: bytes, content_type: str, keep_alive: bool) -> bytes:
    head = (f"HTTP/1.1 {status} {status_phrase(status)}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return head.encode("latin-1") + body


def json_bytes(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "gif": "image/gif"}
NOT_FOUND = {"ok": False, "error_code": 404, "description": "Not Found"}
INTERNAL_ERROR = {"ok": False, "error_code": 500, "description": "Internal Server Error"}


def _loggable_path(path: str) -> str:
    """The request path with any token cut down to its bot id."""
    return re.sub(r"^(/(?:file/)?bot)([^/]*)", lambda m: m.group(1) + bot_id_of(m.group(2)),
                  path)


READ_BUFFER_BYTES = 64 * 1024


class _Connection(asyncio.StreamReaderProtocol, asyncio.BufferedProtocol):
    """asyncio's stream protocol, plus two things.

    A client that goes away (closes its side or resets) while its request is being answered
    cancels that request, so a long poll it gave up (a bot that stopped) ends at once instead
    of at its timeout, and no longer counts as polling.

    Reads land in one buffer per connection (a BufferedProtocol): asyncio's default allocates
    256 KiB for every read, which glibc's malloc may hand back to the system and fault in again
    on every request, costing the server a fifth of its throughput in some runs.
    """

    def __init__(self, reader: asyncio.StreamReader, serve):
        super().__init__(reader, serve)
        self.task: asyncio.Task | None = None  # the task serving this connection
        self.answering = False  # True while a request is being answered
        self._read_buffer = memoryview(bytearray(READ_BUFFER_BYTES))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._read_buffer[:nbytes])  # the reader copies it into its own

    def eof_received(self) -> bool:
        self._client_gone()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._client_gone()
        super().connection_lost(exc)

    def _client_gone(self) -> None:
        if self.answering:
            self.answering = False
            self.task.cancel()


class SandboxServer:
    """The asyncio HTTP/1.1 server (keep-alive, pipelining in order) in front of the core."""

    def __init__(self, core: SandboxCore, host: str = "127.0.0.1", port: int = 0):
        self.core = core
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._user_routes = {
            ("POST", "/sandbox/send"): core.send, ("POST", "/sandbox/press"): core.press,
            ("POST", "/sandbox/fault"): core.fault, ("POST", "/sandbox/revoke"): core.revoke,
            ("GET", "/sandbox/messages"): core.messages, ("GET", "/sandbox/calls"): core.calls,
            ("GET", "/sandbox/health"): core.health,
        }

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(asyncio.StreamReader(limit=64 * 1024), self._serve_connection),
            self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        writer.transport.get_protocol().task = task
        try:
            await self._serve_requests(reader, writer)
        except HttpError as err:
            body = json_bytes({"ok": False, "error_code": err.status, "description": str(err)})
            writer.write(encode_response(err.status, body, "application/json", False))
        except (ConnectionError, asyncio.CancelledError):
            writer.transport.abort()
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve_requests(self, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        connection = writer.transport.get_protocol()
        while True:
            request = await read_request(reader, writer)
            if request is None:
                return
            connection.answering = True
            try:
                status, body, content_type = await self._route(request)
            except Exception:  # a sandbox bug must not look like a network error to the bot
                LOG.exception("internal error answering %s %s", request.method,
                              _loggable_path(request.path))
                status, body, content_type = 500, json_bytes(INTERNAL_ERROR), "application/json"
            finally:
                connection.answering = False
            if body is None:
                writer.transport.abort()
                return
            writer.write(encode_response(status, body, content_type, request.keep_alive))
            await writer.drain()
            if not request.keep_alive:
                return

    async def _route(self, request: Request) -> tuple[int, bytes | None, str]:
        path = request.path
        if path.startswith("/bot"):
            token, _, method = path[len("/bot"):].partition("/")
            try:
                params = parse_form(request)
            except ApiError as err:
                return err.code, json_bytes(err.body()), "application/json"
            status, body = await self.core.call(token, method, params)
            return status, None if body is None else json_bytes(body), "application/json"
        if path.startswith("/file/bot"):
            token, _, file_path = path[len("/file/bot"):].partition("/")
            stored = self.core.file(token, file_path)
            if stored is None:
                return 404, json_bytes(NOT_FOUND), "application/json"
            extension = file_path.rpartition(".")[2]
            return 200, stored.data, CONTENT_TYPES.get(extension, "application/octet-stream")
        handler = self._user_routes.get((request.method, path))
        if handler is None:
            return 404, json_bytes(NOT_FOUND), "application/json"
        return await self._user_route(handler, request)

    async def _user_route(self, handler, request: Request) -> tuple[int, bytes, str]:
        try:
            source = request.query if request.method == "GET" else json.loads(request.body or b"{}")
            if not isinstance(source, dict):
                raise UserError("the body must be a JSON object")
            answer = handler(source)
            if asyncio.iscoroutine(answer):
                answer = await answer
        except (UserError, ValueError) as err:
            detail = str(err) if isinstance(err, UserError) else "the body is not valid JSON"
            return 400, json_bytes({"ok": False, "error_code": 400, "description": detail}), \
                "application/json"
        return 200, json_bytes(answer), "application/json"
