"""OpenAI-format errors: every refusal is a 4xx/5xx with ``{"error": {message, type, param, code}}``.

Handlers are installed on each FastAPI app so malformed JSON, schema violations and unexpected
exceptions all come back in this shape; the server keeps serving after any of them. Unexpected
exceptions are answered with a generic message (their text may hold paths or upstream replies).
"""

from __future__ import annotations

import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("bpo_ray.serving")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_exceeded", 502: "upstream_error", 503: "service_unavailable", 504: "upstream_error"}


class APIError(Exception):
    """An error answered to the client as-is (the message must be safe to show)."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.code, self.param)


def error_body(status: int, message: str, code: Optional[str] = None, param: Optional[str] = None) -> dict:
    err_type = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure in OpenAI's error format."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, "request body is not valid JSON", code="invalid_json"))
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")
        return error_response(APIError(400, msg, code="invalid_request", param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error: %s", type(exc).__name__, exc_info=exc)
        return JSONResponse(error_body(500, "internal server error"), status_code=500)
