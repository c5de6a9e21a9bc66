"""The serving engine: continuous batching, chunked prefill, sampling, streaming, per-token routing.

    engine = Engine("path/to/model", EngineConfig(max_batch=16), adapter_loader=..., background=True)
    handle = engine.submit(Request("Hello", SamplingParams(max_tokens=32), AdapterSpec("math@3")))
    for delta in handle: ...          # or: async for delta in handle
"""

from molora_core.engine.admission import AdapterLoader, RouterLoader
from molora_core.engine.config import EngineConfig
from molora_core.engine.engine import Engine
from molora_core.engine.request import (
    FinishReason,
    Request,
    RequestHandle,
    RequestOutput,
    RouterSpec,
    SamplingParams,
    StreamDelta,
    TokenLogprob,
)
from molora_core.engine.stats import EngineStats

__all__ = [
    "AdapterLoader",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "FinishReason",
    "Request",
    "RequestHandle",
    "RequestOutput",
    "RouterLoader",
    "RouterSpec",
    "SamplingParams",
    "StreamDelta",
    "TokenLogprob",
]
