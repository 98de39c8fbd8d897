"""The user side over HTTP, from any process: SandboxClient and SandboxError.

SandboxClient acts as Telegram users against a sandbox at a URL (send, press, messages,
wait_for_reply, fault, calls, revoke, health) with urllib, so tests, benchmarks, the terminal
chat and another process's code can drive a sandbox they did not start. The runners subclass it.

Imports only the standard library: the terminal chat loads it without any of the server.
"""

import json
import time
import urllib.error
import urllib.parse
import urllib.request


class SandboxError(Exception):
    """The sandbox refused a /sandbox request or could not be reached."""

    def __init__(self, status: int, description: str):
        super().__init__(f"{status}: {description}" if status else description)
        self.status = status
        self.description = description


class SandboxClient:
    """Acts as Telegram users against a sandbox at url, over HTTP with urllib."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def api_url(self) -> str:
        """The Bot API root: python-telegram-bot's base_url, DIMS's TELEGRAM_API_URL."""
        return f"{self.url}/bot"

    @property
    def file_url(self) -> str:
        """python-telegram-bot's base_file_url."""
        return f"{self.url}/file/bot"

    def send(self, token: str, user_id: int, text: str, **profile) -> dict:
        """A private message from the user; profile: first_name, last_name, username."""
        return self._post("send", {"token": token, "user_id": user_id, "text": text, **profile})

    def press(self, token: str, user_id: int, message_id: int, data: str,
              forge: bool = False) -> dict:
        """The user presses the inline button with callback_data == data of a bot message."""
        return self._post("press", {"token": token, "user_id": user_id,
                                    "message_id": message_id, "data": data, "forge": forge})

    def messages(self, token: str, chat_id: int, after: int = 0, wait: float = 0.0,
                 after_seq: int | None = None) -> list[dict]:
        """What the bot sent, edited or deleted in the chat since message `after` was sent
        (edits of it included) and after event after_seq, waiting up to wait s for one."""
        query = {"token": token, "chat_id": chat_id, "after": after, "wait": wait}
        if after_seq is not None:
            query["after_seq"] = after_seq
        return self._get("messages", query, timeout=wait + self.timeout)["messages"]

    def wait_for_reply(self, token: str, chat_id: int, after_seq: int = 0,
                       timeout: float = 10.0, match=None) -> dict:
        """The first bot message event after after_seq (that match(event) accepts)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            for event in self.messages(token, chat_id, after_seq=after_seq, wait=remaining):
                after_seq = event["seq"]
                if match is None or match(event):
                    return event
        raise TimeoutError(f"no matching bot message in chat {chat_id} within {timeout} s")

    def fault(self, token: str, method: str, status: int | None = None, times: int | None = None,
              retry_after: int | None = None, kind: str = "error",
              description: str | None = None, delay: float = 0.0,
              for_s: float | None = None) -> dict:
        """The next `times` calls (default 1) of method ("*": any) fail, or, with for_s, every
        call of it during the next for_s seconds (a window; a getUpdates long poll waiting when
        it opens ends with the fault). kind "error": status (default 500; 429 carries
        retry_after) after delay s; "disconnect": the connection drops unanswered after delay
        s; "slow": the normal answer, after delay s. times=0 clears method's queued faults and
        window ("*": every fault of the bot). Answers {"ok", "method", "pending", "window_s"}."""
        return self._post("fault", {"token": token, "method": method, "status": status,
                                    "times": times, "retry_after": retry_after, "kind": kind,
                                    "description": description, "delay": delay or None,
                                    "for_s": for_s})

    def calls(self, token: str, method: str | None = None) -> list[dict]:
        """The bot's Bot API calls, oldest first (the last 10,000): method, params, status
        (None while the call is in progress, 0 for a dropped connection), description."""
        query = {"token": token} if method is None else {"token": token, "method": method}
        return self._get("calls", query)["calls"]

    def revoke(self, token: str) -> dict:
        """From now on the token is answered 401 Unauthorized, as a revoked token is."""
        return self._post("revoke", {"token": token})

    def health(self, token: str | None = None) -> dict:
        """Liveness, long polls and message waits in progress; with a token, also "bot": is
        it polling, seconds since its last getUpdates ended, webhook set, pending updates."""
        return self._get("health", {} if token is None else {"token": token})

    def _post(self, route: str, body: dict) -> dict:
        data = json.dumps({k: v for k, v in body.items() if v is not None}).encode("utf-8")
        request = urllib.request.Request(f"{self.url}/sandbox/{route}", data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        return self._open(request, self.timeout)

    def _get(self, route: str, query: dict, timeout: float | None = None) -> dict:
        url = f"{self.url}/sandbox/{route}?{urllib.parse.urlencode(query)}"
        return self._open(urllib.request.Request(url), timeout or self.timeout)

    def _open(self, request: urllib.request.Request, timeout: float) -> dict:
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                description = json.loads(body)["description"]
            except (ValueError, KeyError, TypeError):
                description = body.decode("utf-8", "replace")
            raise SandboxError(err.code, description) from None
        except (urllib.error.URLError, OSError) as err:
            raise SandboxError(0, f"sandbox at {self.url} unreachable: {err}") from None
