"""Bounded HTTP load on the serving app over loopback: throughput, TTFT and inter-token latency.

    python benchmarks/serve_load.py                        # starts its own app (demo model)
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --base-model molora-demo

For each concurrency level (1, 8, 32 by default) and each workload, `requests` streamed
completions (fixed length: max_tokens with ignore_eos) are sent by `concurrency` client tasks:
- base:  every request on the base model;
- mixed: requests cycle through the base model, each demo adapter, a two-adapter mixture and the
         `molora:demo-gate` router, so one batch holds many adapters at once.
Throughput = generated tokens / wall time of the level. TTFT = request sent -> first token chunk;
ITL = time between token chunks. Prints a table, writes JSON (device, versions, command), and ends
with `serve_mixed_vs_base_throughput: <ratio>` (mixed / base throughput at the highest level).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, write_json  # noqa: E402
from molora_core.engine.stats import percentile as pct  # noqa: E402

ADAPTERS = ["code", "math", "chat", "multilingual"]


def bodies(workload: str, n: int, base: str, max_tokens: int) -> list[dict]:
    out = []
    for i in range(n):
        body = {"model": base, "prompt": f"Q: What is {i} + {i % 7}? A:", "max_tokens": max_tokens,
                "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        if workload == "mixed":
            k = i % (len(ADAPTERS) + 3)
            if k < len(ADAPTERS):
                body["model"] = ADAPTERS[k]
            elif k == len(ADAPTERS):
                body["adapters"] = [{"name": "code", "weight": 0.5}, {"name": "math", "weight": 0.5}]
            elif k == len(ADAPTERS) + 1:
                body["model"] = "molora:demo-gate"
        out.append(body)
    return out


async def one(client: httpx.AsyncClient, body: dict) -> dict:
    sent = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                return {"error": data["error"]["message"]}
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if data.get("choices") and data["choices"][0]["text"]:
                now = time.perf_counter()
                if first is None:
                    first = now - sent
                else:
                    gaps.append(now - last)
                last = now
    return {"ttft": first, "gaps": gaps, "tokens": tokens}


async def level(url: str, workload: str, concurrency: int, n: int, base: str, max_tokens: int) -> dict:
    queue = bodies(workload, n, base, max_tokens)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker():
            while queue:
                results.append(await one(client, queue.pop()))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "workload": workload, "concurrency": concurrency, "requests": n, "errors": len(results) - len(ok),
        "error_sample": next((r["error"] for r in results if "error" in r), None),
        "tokens": tokens, "wall_s": wall, "throughput_tok_s": tokens / wall if wall else 0.0,
        "ttft_p50_ms": _ms(pct(ttft, 50)), "ttft_p99_ms": _ms(pct(ttft, 99)),
        "itl_p50_ms": _ms(pct(gaps, 50)), "itl_p99_ms": _ms(pct(gaps, 99)),
        "ttft_mean_ms": _ms(statistics.fmean(ttft)) if ttft else None,
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1e3, 2)


def start_app(args) -> tuple[str, str, callable]:
    """Embedded Valkey + Ray Serve app on the demo model; returns (url, base model, stop)."""
    import ray
    from ray import serve

    from deployments import bootstrap
    from deployments.app import build_app
    from deployments.config import AppConfig

    cache = args.cache_dir or tempfile.mkdtemp(prefix="molora-bench-")
    cfg = bootstrap.prepare(AppConfig.from_sources({
        "cache_dir": cache, "num_replicas": args.replicas, "max_batch": args.max_batch, "max_seq_len": 512,
        "max_queue": 256, "hot_slots": 8, "max_rank": 16, "num_cpus_per_replica": args.cpus_per_replica,
    }, env={}))
    ray.init(num_cpus=max(2, args.replicas * int(args.cpus_per_replica) + 1), include_dashboard=False,
             namespace="molora-bench", log_to_driver=False)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="molora", route_prefix="/")

    def stop():
        serve.shutdown()
        ray.shutdown()
        bootstrap.stop_embedded_valkey()

    return f"http://127.0.0.1:{port}", cfg.model_name, stop


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="an already running server; default: start one")
    p.add_argument("--base-model", default="molora-demo")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=0, help="requests per level (default: max(8, 2 x concurrency))")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--cache-dir", help="reuse demo assets across runs (default: a fresh temporary directory)")
    p.add_argument("--out", default="benchmarks/out/serve_load.json")
    args = p.parse_args(argv)

    stop = None
    url, base = args.url, args.base_model
    if url is None:
        url, base, stop = start_app(args)
    rows = []
    try:
        # Warm-up: load every adapter and the router once, so levels measure serving, not cold loads.
        asyncio.run(level(url, "mixed", 4, 8, base, 4))
        for c in args.concurrency:
            n = args.requests or max(8, 2 * c)
            for workload in ("base", "mixed"):
                rows.append(asyncio.run(level(url, workload, c, n, base, args.max_tokens)))
    finally:
        if stop is not None:
            stop()

    head = f"{'workload':8} {'conc':>4} {'reqs':>4} {'err':>3} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9} {'itl p50':>8} {'itl p99':>8}"
    print(head)
    for r in rows:
        print(f"{r['workload']:8} {r['concurrency']:>4} {r['requests']:>4} {r['errors']:>3} {r['throughput_tok_s']:>8.1f} "
              f"{r['ttft_p50_ms'] or 0:>9.1f} {r['ttft_p99_ms'] or 0:>9.1f} {r['itl_p50_ms'] or 0:>8.1f} {r['itl_p99_ms'] or 0:>8.1f}")
    top = max(args.concurrency)
    tput = {r["workload"]: r["throughput_tok_s"] for r in rows if r["concurrency"] == top}
    ratio = tput["mixed"] / tput["base"] if tput.get("base") else float("nan")
    path = write_json(args.out, {"benchmark": "serve_load", "env": environment(), "url": url, "base_model": base,
                                 "max_tokens": args.max_tokens, "replicas": args.replicas, "rows": rows,
                                 "serve_mixed_vs_base_throughput": ratio})
    print(f"wrote {path}")
    print(f"serve_mixed_vs_base_throughput: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
