"""Manifests: the registry's record of one version of an adapter or a router.

A manifest is published only after every file it lists is stored (content-addressed by sha256)
and verified. ``sha256`` of an artifact is the content id over its files (see ``content_id``), so
registering the same content twice under one name is recognised and answered idempotently.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .base_model import BaseModelSignature
from .errors import InvalidName

NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$"
_NAME_RE = re.compile(NAME_PATTERN)
SHA256_PATTERN = r"^[0-9a-f]{64}$"


def check_name(name: str, what: str = "adapter") -> str:
    """Return ``name`` if it matches NAME_PATTERN, else raise InvalidName naming it."""
    # fullmatch: with re.match, '$' also matches before a final newline ('x\n' would pass here and
    # then fail the manifest's pattern after the blobs were stored).
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"{what} name {name!r} is invalid: expected 1-64 characters of [a-z0-9._-], starting and "
            f"ending with a letter or digit, no '..' (pattern {NAME_PATTERN})",
            param="name",
        )
    return name


class FileEntry(BaseModel):
    """One file of an artifact, stored as the blob named by its sha256."""

    model_config = ConfigDict(frozen=True)
    path: str = Field(description="File name inside the artifact directory, e.g. adapter_model.safetensors.")
    sha256: str = Field(pattern=SHA256_PATTERN, description="Hex sha256 of the file's bytes (the blob key).")
    size: int = Field(ge=0, description="Bytes.")


def content_id(files: list[FileEntry], extra: str = "") -> str:
    """The artifact's sha256: a hash over (path, sha256, size) of its files, sorted by path, and
    ``extra`` (what else defines the artifact, e.g. a router's kind and adapter list)."""
    h = hashlib.sha256(extra.encode())
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.sha256}\0{f.size}\n".encode())
    return h.hexdigest()


class ArtifactManifest(BaseModel):
    # allow_inf_nan=False: JSON has no infinity, so an inf would be stored as null and then fail
    # to decode on every read of the name (and of every listing that includes it).
    model_config = ConfigDict(frozen=True, allow_inf_nan=False)
    name: str = Field(pattern=NAME_PATTERN, description="Artifact name (strict pattern).")
    version: int = Field(0, ge=0, description="Monotonic per name, assigned by the registry (0 = not yet).")
    sha256: str = Field(pattern=SHA256_PATTERN, description="Content id over the files (see content_id).")
    size: int = Field(ge=0, description="Total bytes of all files.")
    files: list[FileEntry] = Field(description="The artifact's files, each a content-addressed blob.")
    description: str = Field("", max_length=4096, description="Free text.")
    tags: list[str] = Field(default_factory=list, max_length=64, description="Free-form labels for filtering.")
    created_at: float = Field(0.0, ge=0, description="Unix time of registration.")


class AdapterManifest(ArtifactManifest):
    """One registered version of a LoRA adapter (PEFT format)."""

    rank: int = Field(gt=0, description="LoRA rank r (the largest, when rank_pattern varies it).")
    alpha: float = Field(gt=0, description="lora_alpha.")
    use_rslora: bool = Field(False, description="Scale is alpha/sqrt(r) instead of alpha/r.")
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="PEFT per-module rank overrides.")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="PEFT per-module alpha overrides.")
    target_modules: list[str] = Field(description="Projections the adapter has weights for, sorted.")
    layers: list[int] = Field(description="Decoder layer indices the adapter has weights for, sorted.")
    dtype: str = Field(description="safetensors dtype of the weights, e.g. BF16.")
    base_model: BaseModelSignature = Field(description="Signature of the base model the adapter was checked against.")
    base_model_name_or_path: str = Field("", description="As written in adapter_config.json (informational).")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class RouterManifest(ArtifactManifest):
    """One registered version of a router (a gate router, later task routers)."""

    kind: Literal["gate", "task"] = Field(description="gate: MoLoRA per-token gate; task: LORAUTER task embeddings.")
    adapters: list[str] = Field(min_length=1, description="Ordered adapter names; output i of the router is adapters[i].")
    weights_sha256: str = Field(pattern=SHA256_PATTERN, description="sha256 of router.safetensors.")
    base_model_id: str = Field(description="Signature id of the base model the router was trained on.")


Kind = Literal["adapter", "router"]
MANIFEST_TYPES: dict[str, type[ArtifactManifest]] = {"adapter": AdapterManifest, "router": RouterManifest}
