"""The serving app's configuration: one pydantic model, filled from a Serve config file's `args`
and from MOLORA_* environment variables (the environment wins over file values only where the
file leaves a field unset).

    serve run deployments.app:app                      # defaults + environment
    serve run deployments/config.yaml                  # applications[].args + environment
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from adapter_store.errors import StoreError
from adapter_store.storage import check_storage_uri

# field -> environment variable. Every variable a manifest sets must be one of these.
ENV_VARS: dict[str, str] = {
    "model_path": "MOLORA_MODEL_PATH",
    "model_name": "MOLORA_MODEL_NAME",
    "dtype": "MOLORA_DTYPE",
    "device": "MOLORA_DEVICE",
    "hot_slots": "MOLORA_HOT_SLOTS",
    "max_rank": "MOLORA_MAX_RANK",
    "max_batch": "MOLORA_MAX_BATCH",
    "max_seq_len": "MOLORA_MAX_SEQ_LEN",
    "max_queue": "MOLORA_MAX_QUEUE",
    "max_top_k": "MOLORA_MAX_TOP_K",
    "prefix_caching": "MOLORA_PREFIX_CACHING",
    "max_adapter_bytes": "MOLORA_MAX_ADAPTER_BYTES",
    "redis_url": "MOLORA_REDIS_URL",
    "storage_uri": "MOLORA_STORAGE_URI",
    "s3_endpoint_url": "MOLORA_S3_ENDPOINT_URL",
    "cache_dir": "MOLORA_CACHE_DIR",
    "cache_max_bytes": "MOLORA_CACHE_MAX_BYTES",
    "api_key": "MOLORA_API_KEY",
    "register_demo_assets": "MOLORA_REGISTER_DEMO_ASSETS",
    "num_replicas": "MOLORA_NUM_REPLICAS",
    "min_replicas": "MOLORA_MIN_REPLICAS",
    "max_replicas": "MOLORA_MAX_REPLICAS",
    "target_ongoing_requests": "MOLORA_TARGET_ONGOING_REQUESTS",
    "num_gpus_per_replica": "MOLORA_NUM_GPUS_PER_REPLICA",
    "num_cpus_per_replica": "MOLORA_NUM_CPUS_PER_REPLICA",
}


class AppConfig(BaseModel):
    """Everything the MoLoRA Serve app reads. Field names are the keys of a Serve config's `args`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_path: str | None = Field(
        None, description="Local Hugging Face model directory (Llama/Qwen2/Qwen3/Mistral). None: the demo model, made locally."
    )
    model_name: str | None = Field(None, description="Name clients pass as `model` for the base model; default: the directory name.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bfloat16 on CUDA, float32 on CPU.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU.")
    hot_slots: int = Field(8, ge=1, le=1024, description="Adapters resident at once per replica (hot-set slots).")
    max_rank: int = Field(64, ge=1, le=1024, description="Largest LoRA rank a slot holds.")
    max_batch: int = Field(16, ge=1, le=4096, description="Sequences decoded together per step.")
    max_seq_len: int = Field(2048, ge=16, le=1 << 20, description="Prompt + completion tokens per sequence.")
    max_queue: int = Field(
        256, ge=1, le=1 << 20,
        description="Requests a replica queues beyond its batch (and the ingress queues beyond those) before 429.",
    )
    max_top_k: int = Field(
        4, ge=1, le=16, description="Most adapters one token mixes: a mixture's members, a gate router's top-k. "
        "Every decode step with adapters runs this many choices a token."
    )
    prefix_caching: bool = Field(
        True, description="Reuse a finished or running request's prompt keys and values (same routing) for a new "
        "request whose prompt begins with the same tokens.",
    )
    max_adapter_bytes: int = Field(512 << 20, gt=0, description="Cap on an uploaded adapter's bytes.")
    redis_url: str | None = Field(None, description="Registry Redis; None starts an embedded Valkey under cache_dir.")
    storage_uri: str | None = Field(None, description="file:///path or s3://bucket/prefix; None: cache_dir/storage.")
    s3_endpoint_url: str | None = Field(None, description="Endpoint of an S3-compatible store.")
    cache_dir: str = Field("~/.cache/molora", description="Disk cache, demo assets and embedded Valkey data.")
    cache_max_bytes: int = Field(8 << 30, gt=0, description="Disk cache cap (LRU).")
    api_key: SecretStr | None = Field(None, description="Bearer token for registry mutations; None leaves them open.")
    register_demo_assets: bool = Field(True, description="With the demo model, register its adapters and router at start-up.")
    num_replicas: int | None = Field(None, ge=1, le=1024, description="Fixed replica count; None uses autoscaling.")
    min_replicas: int = Field(1, ge=0, le=1024, description="Autoscaling lower bound.")
    max_replicas: int = Field(1, ge=1, le=1024, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Autoscaling target of in-flight requests per replica.")
    num_gpus_per_replica: float = Field(0.0, ge=0, le=8, description="GPUs reserved per model replica (1 on a GPU node).")
    num_cpus_per_replica: float = Field(1.0, gt=0, le=256, description="CPUs reserved per model replica.")

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, values):
        """A blank string means unset, in `args` as in the environment: the field's default. Values
        lose surrounding whitespace (a Secret made from a file keeps its final newline)."""
        if isinstance(values, Mapping):
            values = {k: v.strip() if isinstance(v, str) else v for k, v in values.items()
                      if not (isinstance(v, str) and not v.strip())}
        return values

    @field_validator("storage_uri")
    @classmethod
    def _storage_uri(cls, uri: str | None) -> str | None:
        if uri is not None:
            try:
                check_storage_uri(uri)
            except StoreError as e:
                raise ValueError(e.message) from None
        return uri

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        parts = urlsplit(url or "")
        if url is not None and not ((parts.scheme in ("redis", "rediss") and parts.hostname)
                                    or (parts.scheme == "unix" and parts.path)):
            raise ValueError(f"not a Redis URL (scheme {parts.scheme!r}), expected redis://[:password@]host:port[/db], "
                             "rediss://... or unix:///path")
        return url

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint(cls, url: str | None) -> str | None:
        parts = urlsplit(url or "")
        if url is not None and not (parts.scheme in ("http", "https") and parts.hostname):
            raise ValueError(f"{url!r} is not an endpoint URL, expected http(s)://host[:port]")
        return url

    @model_validator(mode="after")
    def _check(self) -> "AppConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is over max_replicas {self.max_replicas}")
        if self.device == "cpu" and self.num_gpus_per_replica:
            raise ValueError(f"device 'cpu' with num_gpus_per_replica={self.num_gpus_per_replica}; expected 0")
        if self.device == "cuda" and not self.num_gpus_per_replica:
            # (Ray hides every GPU from an actor that reserves none: its replicas would find no CUDA.)
            raise ValueError("device 'cuda' with num_gpus_per_replica=0; expected a GPU share above 0")
        return self

    @classmethod
    def from_sources(cls, args: Mapping | None = None, env: Mapping[str, str] | None = None) -> "AppConfig":
        """File `args` first, then MOLORA_* variables for the fields the file leaves unset."""
        env = os.environ if env is None else env
        values = dict(args or {})
        for field, var in ENV_VARS.items():
            if field not in values and env.get(var, "") != "":
                values[field] = env[var]
        return cls.model_validate(values)

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser()

    def autoscaling_config(self) -> dict | None:
        if self.num_replicas is not None:
            return None
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }
