"""The Cloudflare v4 envelope and the Images error codes, with the HTTP status each one maps to."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify

# Code → HTTP status. Mostly "code - 5000" as the API doc says, except where that is not a real or
# sensible status (5401 "variant not found" is a 404, 5455 "unsupported format" a 415, …).
STATUS_FOR_CODE: dict[int, int] = {
    971: 429,
    5400: 400,
    5401: 404,
    5403: 403,
    5404: 404,
    5408: 408,
    5409: 409,
    5410: 410,
    5411: 400,
    5413: 413,
    5415: 415,
    5443: 413,
    5454: 400,
    5455: 415,
    5500: 500,
    5503: 503,
    7000: 400,
    7001: 405,
    7003: 404,
    7011: 413,
    10000: 401,
}


class CfError(Exception):
    """An API failure answered as a Cloudflare envelope with one error."""

    def __init__(self, code: int, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS_FOR_CODE.get(code, 400)
        self.headers: dict[str, str] = {}

    def response(self) -> Response:
        """Render this error as an envelope response."""
        resp = envelope(None, success=False, errors=[{"code": self.code, "message": self.message}])
        resp.status_code = self.status
        resp.headers.update(self.headers)
        return resp


def envelope(
    result: Any,
    *,
    success: bool = True,
    errors: list[dict[str, Any]] | None = None,
    result_info: dict[str, Any] | None = None,
    status: int = 200,
) -> Response:
    """Wrap `result` in the v4 envelope."""
    body: dict[str, Any] = {
        "success": success,
        "errors": errors or [],
        "messages": [],
        "result": result,
    }
    if result_info is not None:
        body["result_info"] = result_info
    resp = jsonify(body)
    resp.status_code = status
    return resp
