"""HTTP bodies of the registry routes, and the OpenAI-style error body."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import StoreError
from .manifest import NAME_PATTERN


class RegisterFromUri(BaseModel):
    """JSON body of ``POST /v1/adapters``: register a PEFT directory already in object storage."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN, description="Adapter name.")
    uri: str = Field(min_length=1, max_length=2048, description="Directory URI inside the configured storage.")
    description: str = Field("", max_length=4096, description="Free text.")
    tags: list[str] = Field(default_factory=list, max_length=64, description="Labels for filtering.")


class RegisterRouterFromUri(RegisterFromUri):
    """JSON body of ``POST /v1/routers``: a router directory (router.safetensors) in storage."""

    kind: Literal["gate", "task"] = Field(description="Router kind.")
    adapters: list[str] = Field(min_length=1, max_length=4096, description="Ordered adapter names.")


class DeleteResult(BaseModel):
    object: str = Field(description="'adapter.deleted' or 'router.deleted'.")
    name: str
    deleted_versions: list[int] = Field(description="Versions tombstoned by this call.")


def error_body(message: str, type: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def store_error_body(e: StoreError) -> dict:
    return error_body(e.message, e.type, e.code, e.param)
