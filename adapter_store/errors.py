"""Domain errors of the adapter store.

Each error names the offending value and what was expected, and carries the one HTTP status,
OpenAI-style ``type`` and machine-readable ``code`` that the registry routes answer with.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every adapter-store error."""

    status: int = 500
    type: str = "server_error"
    code: str = "store_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class AdapterInvalid(StoreError):
    """The adapter (config, weights, archive or request) is not acceptable."""

    status = 400
    type = "invalid_request_error"
    code = "adapter_invalid"


class RouterInvalid(AdapterInvalid):
    """The router artifact is not acceptable."""

    code = "router_invalid"


class InvalidName(AdapterInvalid):
    """An artifact name does not match the strict name pattern."""

    code = "invalid_name"


class PickledWeights(AdapterInvalid):
    """Pickled weights (.bin, .pt, ...) were offered; only safetensors are accepted."""

    code = "pickled_weights"


class UnsafeArchive(AdapterInvalid):
    """An archive member would escape the extraction directory or is not a regular file."""

    code = "unsafe_archive"


class UriOutsideStorage(AdapterInvalid):
    """A storage URI is not inside the configured storage."""

    status = 403
    type = "permission_error"
    code = "uri_outside_storage"


class AdapterTooLarge(StoreError):
    """The upload or referenced files exceed the configured size cap."""

    status = 413
    type = "invalid_request_error"
    code = "adapter_too_large"


class NotFound(StoreError):
    """Base of the 'no such artifact' errors."""

    status = 404
    type = "not_found_error"
    code = "not_found"


class AdapterNotFound(NotFound):
    code = "adapter_not_found"


class RouterNotFound(NotFound):
    code = "router_not_found"


class AdapterInUse(StoreError):
    """An adapter cannot be deleted while a registered router routes to it."""

    status = 409
    type = "invalid_request_error"
    code = "adapter_in_use"


class Unauthorized(StoreError):
    """A mutation came without the right bearer token."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class IntegrityError(StoreError):
    """Bytes read back from storage do not hash to the expected sha256."""

    status = 502
    type = "server_error"
    code = "integrity_error"


class RegistryUnavailable(StoreError):
    """Redis could not be reached after the bounded retries."""

    status = 503
    type = "server_error"
    code = "registry_unavailable"


class StorageUnavailable(StoreError):
    """Object storage could not be reached or refused the operation."""

    status = 503
    type = "server_error"
    code = "storage_unavailable"


class ConfigError(StoreError):
    """Store settings or a base model config are not usable."""

    status = 500
    type = "server_error"
    code = "config_error"
