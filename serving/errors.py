"""The one error type of the HTTP API: a status and a message, rendered as JSON ``{error, status, message}``."""

from __future__ import annotations

from typing import Any

# 499 is nginx's "client closed request": only metrics and logs see it, never a client.
ERROR_KINDS = {
    400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
    413: "too_large", 415: "unsupported_media_type", 422: "invalid_parameter", 499: "client_closed_request",
    500: "internal_error", 503: "overloaded",
}


class ApiError(Exception):
    """An HTTP error with a human-readable message; the ingress renders it as JSON."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": ERROR_KINDS.get(self.status, "error"), "status": self.status, "message": self.message}
