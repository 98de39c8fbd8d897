"""The Bot API's error answers: ApiError and the helpers that build Telegram's descriptions.

Raised by the spec checks, the text parsers, the bot state and the Bot API methods; the core
turns one into the answer {"ok": false, "error_code", "description", "parameters"}, and the
HTTP server uses status_phrase for its status lines.

Imports only the standard library, nothing of the package.
"""

import http

class ApiError(Exception):
    """A Bot API error answer: {"ok": false, "error_code", "description", "parameters"}."""

    def __init__(self, code: int, description: str, parameters: dict | None = None):
        super().__init__(description)
        self.code = code
        self.description = description
        self.parameters = parameters

    def body(self) -> dict:
        body = {"ok": False, "error_code": self.code, "description": self.description}
        if self.parameters:
            body["parameters"] = self.parameters
        return body


def bad_request(detail: str) -> ApiError:
    return ApiError(400, f"Bad Request: {detail}")


def too_many_requests(retry_after: int) -> ApiError:
    return ApiError(429, f"Too Many Requests: retry after {retry_after}",
                    {"retry_after": retry_after})


def status_phrase(status: int) -> str:
    """The HTTP reason phrase of a status ("Too Many Requests"), "Error" for unknown ones."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"
