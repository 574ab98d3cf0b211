"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}.

Everything a client can send maps to a 4xx; only our own bugs become a 500. gRPC status codes
from the workers map to HTTP statuses here, in one table.
"""
from __future__ import annotations

import json

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

RETRY_AFTER_S = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str | None = None, param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or _default_type(status)
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _default_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error", 503: "service_unavailable"}.get(status, "server_error" if status >= 500 else
                                                                    "invalid_request_error")


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, code="no_workers", retry_after=RETRY_AFTER_S)


_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "context_length_exceeded"),
    grpc.StatusCode.FAILED_PRECONDITION: (503, None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, None),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, None),
    grpc.StatusCode.NOT_FOUND: (404, None),
    grpc.StatusCode.CANCELLED: (499, None),
}


def from_grpc(code: grpc.StatusCode, details: str) -> ApiError:
    status, err_code = _GRPC_TO_HTTP.get(code, (502, None))
    retry = RETRY_AFTER_S if status in (429, 503) else None
    return ApiError(status, f"worker error ({code.name}): {details}", code=err_code, retry_after=retry)


def _param_of(loc: tuple) -> str | None:
    """pydantic location ("body", "messages", 0, "role") -> "messages[0].role"."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("str", "list[ContentPart]", "function-after[_name(), str]") or "[" in str(p) or "-" in str(p):
            continue   # union-branch tags pydantic puts into the location
        else:
            out += ("." if out else "") + str(p)
    return out or None


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return invalid(f"malformed JSON: {first.get('msg')}").response()
        param = _param_of(tuple(first.get("loc", ())))
        msg = first.get("msg", "invalid request")
        return invalid(f"{param}: {msg}" if param else msg, param=param).response()

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, e: json.JSONDecodeError):
        return invalid(f"malformed JSON: {e}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return ApiError(e.status_code, str(e.detail)).response()
