"""The registry's HTTP routes, as a FastAPI APIRouter the ingress mounts.

    POST   /v1/adapters            multipart (adapter files or one archive, + name, description,
                                   tags) or JSON {name, uri, description, tags}
    GET    /v1/adapters            ?limit=&cursor=&tag=&prefix=
    GET    /v1/adapters/{name}     ?version=
    GET    /v1/adapters/{name}/versions
    DELETE /v1/adapters/{name}     ?version=  (all versions when omitted)
    ... and the same under /v1/routers (multipart adds kind and adapters fields).

With an API key set, POST and DELETE need ``Authorization: Bearer <key>`` (compared in constant
time); reads stay open. Every error is one status with ``{"error": {message, type, param, code}}``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import SecretStr, ValidationError
from starlette.concurrency import run_in_threadpool

from .errors import AdapterInvalid, AdapterTooLarge, RouterInvalid, StoreError, Unauthorized
from .http_models import DeleteResult, RegisterFromUri, RegisterRouterFromUri, error_body, store_error_body
from .manifest import ArtifactManifest
from .registry import Page, RegisterResult, Registry
from .uploads import field, list_field, receive_upload


_MAX_JSON_BYTES = 64 << 10


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    return f"{param or 'request'}: {first.get('msg', 'invalid')} (got {first.get('input')!r})", param


class _ErrorRoute(APIRoute):
    """Turns domain errors and request validation errors into OpenAI-style bodies (an APIRouter
    cannot register app-level exception handlers, and the ingress may mount several routers)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def run(request: Request):
            try:
                return await handler(request)
            except StoreError as e:
                return JSONResponse(store_error_body(e), status_code=e.status)
            except RequestValidationError as e:
                message, param = _validation_message(list(e.errors()))
                return JSONResponse(error_body(message, "invalid_request_error", "invalid_request", param), 400)

        return run


def _manifest_json(m: ArtifactManifest, kind: str) -> dict[str, Any]:
    return {"object": kind, **m.model_dump(mode="json")}


def _page_json(page: Page, kind: str) -> dict[str, Any]:
    return {"object": "list", "data": [_manifest_json(m, kind) for m in page.items], "next_cursor": page.next_cursor}


def build_registry_router(
    registry: Registry, *, api_key: str | SecretStr | None = None, max_upload_bytes: int | None = None
) -> APIRouter:
    """The registry API over ``registry``. ``max_upload_bytes`` defaults to the store's cap."""
    key = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
    key_bytes = key.encode() if key else None
    cap = max_upload_bytes or registry.limits.max_adapter_bytes
    router = APIRouter(route_class=_ErrorRoute, tags=["registry"])

    def authorize(request: Request) -> None:
        if key_bytes is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key_bytes):
            raise Unauthorized("registry mutations need 'Authorization: Bearer <MOLORA_API_KEY>'")

    async def read_json_body(request: Request) -> bytes:
        """The body, read up to the cap as it streams (a chunked body has no Content-Length)."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > _MAX_JSON_BYTES:
            raise AdapterTooLarge(f"JSON body of {length} bytes, expected at most {_MAX_JSON_BYTES}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_JSON_BYTES:
                raise AdapterTooLarge(f"JSON body is over {_MAX_JSON_BYTES} bytes, expected at most that")
        return bytes(body)

    async def parse_json(request: Request, model: type):
        try:
            return model.model_validate(json.loads(await read_json_body(request)))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, ValidationError, nesting
            if isinstance(e, ValidationError):
                message, param = _validation_message(e.errors())
                raise AdapterInvalid(message, param=param) from None
            raise AdapterInvalid(f"request body is not valid JSON: {e}") from None

    def created(result: RegisterResult, kind: str) -> JSONResponse:
        body = {**_manifest_json(result.manifest, kind), "created": result.created}
        return JSONResponse(body, status_code=201 if result.created else 200)

    async def register(request: Request, kind: str) -> JSONResponse:
        authorize(request)
        invalid = RouterInvalid if kind == "router" else AdapterInvalid
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            staging = registry.staging()
            try:
                fields = await receive_upload(request, staging, max_bytes=cap, kind=kind)
                name = field(fields, "name")
                if not name:
                    raise invalid("multipart field 'name' is required", param="name")
                common = dict(description=field(fields, "description", "") or "", tags=list_field(fields, "tags"))
                if kind == "adapter":
                    result = await run_in_threadpool(registry.register_adapter, staging, name, **common)
                else:
                    result = await run_in_threadpool(
                        registry.register_router, staging, name,
                        kind=field(fields, "kind", "") or "", adapters=list_field(fields, "adapters"), **common,
                    )
            finally:
                registry.discard(staging)
        elif ctype.startswith("application/json"):
            if kind == "adapter":
                body = await parse_json(request, RegisterFromUri)
                result = await run_in_threadpool(
                    registry.register_adapter_from_uri, body.uri, body.name,
                    description=body.description, tags=body.tags,
                )
            else:
                body = await parse_json(request, RegisterRouterFromUri)
                result = await run_in_threadpool(
                    registry.register_router_from_uri, body.uri, body.name,
                    kind=body.kind, adapters=body.adapters, description=body.description, tags=body.tags,
                )
        else:
            raise AdapterInvalid(
                f"content type {ctype!r} is not accepted, expected multipart/form-data or application/json"
            )
        return created(result, kind)

    for kind in ("adapter", "router"):
        _add_routes(router, registry, kind, register, authorize)
    return router


def _add_routes(router: APIRouter, registry: Registry, kind: str, register: Callable, authorize: Callable) -> None:
    plural = f"{kind}s"
    get_one = registry.get_adapter if kind == "adapter" else registry.get_router
    list_all = registry.list_adapters if kind == "adapter" else registry.list_routers
    delete = registry.delete_adapter if kind == "adapter" else registry.delete_router
    table = registry.adapters if kind == "adapter" else registry.routers

    async def post(request: Request) -> JSONResponse:
        return await register(request, kind)

    async def get_list(
        limit: int = Query(100, ge=1, le=1000, description="Page size."),
        cursor: str | None = Query(None, max_length=128, description="next_cursor of the previous page."),
        tag: str | None = Query(None, max_length=64, description="Only artifacts with this tag."),
        prefix: str = Query("", max_length=64, description="Only names starting with this."),
    ) -> JSONResponse:
        page = await run_in_threadpool(list_all, limit, cursor, tag, prefix)
        return JSONResponse(_page_json(page, kind))

    async def get_item(
        name: str, version: int | None = Query(None, ge=1, description="Pinned version; latest when omitted.")
    ) -> JSONResponse:
        return JSONResponse(_manifest_json(await run_in_threadpool(get_one, name, version), kind))

    async def get_versions(name: str) -> JSONResponse:
        await run_in_threadpool(get_one, name)
        versions = await run_in_threadpool(table.versions, name)
        return JSONResponse({"object": "list", "data": [_manifest_json(m, kind) for m in versions]})

    async def delete_item(
        request: Request, name: str,
        version: int | None = Query(None, ge=1, description="Delete one version; all when omitted."),
    ) -> JSONResponse:
        authorize(request)
        gone = await run_in_threadpool(delete, name, version)
        return JSONResponse(DeleteResult(object=f"{kind}.deleted", name=name, deleted_versions=gone).model_dump())

    router.add_api_route(f"/v1/{plural}", post, methods=["POST"], summary=f"Register a {kind}")
    router.add_api_route(f"/v1/{plural}", get_list, methods=["GET"], summary=f"List {plural}")
    router.add_api_route(f"/v1/{plural}/{{name}}", get_item, methods=["GET"], summary=f"Get a {kind}")
    router.add_api_route(f"/v1/{plural}/{{name}}/versions", get_versions, methods=["GET"], summary="List versions")
    router.add_api_route(f"/v1/{plural}/{{name}}", delete_item, methods=["DELETE"], summary=f"Delete a {kind}")
