"""Domain errors of the model side. Each names the offending value and what was expected."""


class MoLoRAError(Exception):
    """Base class of molora_core's domain errors."""


class AdapterInvalid(MoLoRAError, ValueError):
    """An adapter does not fit the model or the hot-set (shapes, rank, module, values, format)."""


class AdapterNotFound(MoLoRAError, LookupError):
    """No adapter (or slot) under that name."""


class CapacityExceeded(MoLoRAError, RuntimeError):
    """Every slot (or queue place) is taken by something that cannot be evicted right now."""


class RouterInvalid(MoLoRAError, ValueError):
    """A router artifact or routing spec is malformed or names adapters it cannot use."""


class ModelLoadError(MoLoRAError, ValueError):
    """A model directory cannot be loaded (missing files, unsupported architecture, format)."""


class RequestInvalid(MoLoRAError, ValueError):
    """A generation request is malformed (empty or over-long prompt, bad sampling values, stop)."""
