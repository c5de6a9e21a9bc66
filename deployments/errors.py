"""HTTP errors of the serving API: one status, OpenAI-style type and code per failure.

Domain errors come from three places (molora_core, adapter_store, and this package); `classify`
maps each to what the client sees, so the ingress and the model replica agree on one table. The
replica sends errors as data (`error_item`), never as raised exceptions, so nothing depends on an
exception surviving Ray's pickling.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapter_store.errors import StoreError
from molora_core.errors import AdapterInvalid, AdapterNotFound, CapacityExceeded, RequestInvalid, RouterInvalid


@dataclass(eq=False)  # not frozen: Python assigns __traceback__ to a raised exception
class ApiError(Exception):
    """An error with its HTTP status and OpenAI-style fields."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str = "invalid_request"
    param: str | None = None
    retry_after_s: int | None = None  # 429 / 503: the Retry-After header

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_item(self) -> dict:
        """The error as a plain dict, as the replica streams it to the ingress."""
        return {"type": "error", "status": self.status, "message": self.message, "error_type": self.type,
                "code": self.code, "param": self.param, "retry_after_s": self.retry_after_s}

    @classmethod
    def from_item(cls, item: dict) -> "ApiError":
        return cls(item["status"], item["message"], item["error_type"], item["code"], item.get("param"),
                   item.get("retry_after_s"))


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def model_not_found(model: str, why: str) -> ApiError:
    return ApiError(404, f"model {model!r} {why}", "not_found_error", "model_not_found", "model")


def overloaded(message: str, retry_after_s: int = 1) -> ApiError:
    return ApiError(429, message, "rate_limit_error", "overloaded", None, retry_after_s)


def unavailable(message: str, retry_after_s: int = 2) -> ApiError:
    return ApiError(503, message, "server_error", "unavailable", None, retry_after_s)


def classify(exc: BaseException) -> ApiError:
    """The ApiError a domain (or unexpected) exception answers with."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, StoreError):
        retry = 2 if exc.status == 503 else None
        return ApiError(exc.status, exc.message, exc.type, exc.code, exc.param, retry)
    if isinstance(exc, RequestInvalid):
        code = "context_length_exceeded" if "max_seq_len" in str(exc) else "invalid_request"
        return bad_request(str(exc), code=code)
    if isinstance(exc, (AdapterInvalid, RouterInvalid)):
        return bad_request(str(exc), code="adapter_invalid")
    if isinstance(exc, AdapterNotFound):
        return ApiError(404, str(exc), "not_found_error", "adapter_not_found", "model")
    if isinstance(exc, CapacityExceeded):
        return overloaded(str(exc))
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error")
