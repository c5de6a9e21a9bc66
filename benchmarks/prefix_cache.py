"""Prefix-caching benchmark: the engine with `prefix_caching` on against the same engine with it
off, interleaved in one process, on workloads whose prompts share prefixes.

Scenarios (a random Qwen3-architecture model and 4 rank-16 adapters, as `benchmarks/engine.py`):
- `system_prompt_<routing>`: 16 requests with one long system prompt and a short question
  each, submitted together; routed one adapter per request over 4 adapters (only requests on
  one adapter can share), or all through one gate router over the 4 (every request shares).
- `chat_next_turn`: 16 conversations on 4 adapters; the first turns run (untimed), then the
  second turns, whose prompts are the first turns' prompts and answers plus a follow-up, are
  timed.
Every repeat draws fresh token ids, so nothing is shared across repeats; greedy decoding, EOS
ignored.

    .venv/bin/python benchmarks/prefix_cache.py --quick [--repeats 5] [--out FILE]

Prints a table and writes JSON; ends with `prefix_cache_speedup_<scenario>: <on / off tokens/s>`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from benchmarks.engine import NUM_ADAPTERS, RANK, SIZES, make_assets  # noqa: E402
from molora_core.engine import Engine, EngineConfig, Request, SamplingParams  # noqa: E402
from molora_core.model import load_pretrained  # noqa: E402
from molora_core.peft_io import load_peft_adapter  # noqa: E402
from molora_core.routing import AdapterSpec, GateRouter, GateSpec  # noqa: E402

# system prompt, question, first-turn answer, follow-up, new tokens
LENGTHS = {"quick": dict(system=256, question=16, answer=32, follow_up=16, new=16),
           "full": dict(system=1024, question=32, answer=128, follow_up=32, new=64)}


def _ids(gen: torch.Generator, vocab: int, n: int) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=gen).tolist()


def system_prompt_batch(seed: int, s: dict, n: dict, routing_of) -> list[Request]:
    gen = torch.Generator().manual_seed(seed)
    system = _ids(gen, s["vocab"], n["system"])
    sampling = SamplingParams(max_tokens=n["new"], ignore_eos=True)
    return [Request(system + _ids(gen, s["vocab"], n["question"]), sampling, routing_of(i)) for i in range(s["batch"])]


def timed(engine: Engine, reqs: list[Request]) -> dict:
    started = time.perf_counter()
    outs = engine.generate(reqs)
    wall = time.perf_counter() - started
    tokens = sum(o.completion_tokens for o in outs)
    return {"seconds": wall, "tokens_per_s": tokens / wall, "prompt_tokens": sum(o.prompt_tokens for o in outs),
            "cached_tokens": sum(o.cached_tokens for o in outs)}


def chat_second_turns(engine: Engine, seed: int, s: dict, n: dict) -> dict:
    gen = torch.Generator().manual_seed(seed)
    routing = [AdapterSpec(f"a{i % NUM_ADAPTERS}") for i in range(s["batch"])]
    first = [_ids(gen, s["vocab"], n["system"] // 2) for _ in range(s["batch"])]
    answers = engine.generate([Request(p, SamplingParams(max_tokens=n["answer"], ignore_eos=True), r)
                               for p, r in zip(first, routing)])
    second = [p + list(a.token_ids) + _ids(gen, s["vocab"], n["follow_up"]) for p, a in zip(first, answers)]
    sampling = SamplingParams(max_tokens=n["new"], ignore_eos=True)
    return timed(engine, [Request(p, sampling, r) for p, r in zip(second, routing)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU sizes (the engine benchmark's quick model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per scenario and engine (median)")
    parser.add_argument("--out", default="benchmarks/out/prefix_cache.json")
    args = parser.parse_args()
    size = "quick" if args.quick else "full"
    s, n = SIZES[size], LENGTHS[size]
    device = torch.device(args.device)
    dtype_name = "float32" if device.type == "cpu" else "bfloat16"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_assets(root, s, getattr(torch, dtype_name))
        longest = n["system"] // 2 + n["answer"] + n["follow_up"] + n["new"]
        config = EngineConfig(max_batch=s["batch"], max_seq_len=max(longest, n["system"] + n["question"] + n["new"]) + 8,
                              hot_slots=NUM_ADAPTERS, max_rank=RANK, max_top_k=2, prefill_chunk=256,
                              max_queue=4 * s["batch"])
        loader = lambda name: load_peft_adapter(root / name, name=name)  # noqa: E731
        engines = {on: Engine(load_pretrained(root / "model", dtype_name, device),
                              config.model_copy(update={"prefix_caching": on}), adapter_loader=loader)
                   for on in (True, False)}
        torch.manual_seed(7)
        gate = GateRouter(s["hidden"], [f"a{i}" for i in range(NUM_ADAPTERS)], top_k=2).to(device)
        scenarios = {
            "system_prompt_adapter_per_request": lambda e, seed: timed(
                e, system_prompt_batch(seed, s, n, lambda i: AdapterSpec(f"a{i % NUM_ADAPTERS}"))),
            "system_prompt_gate": lambda e, seed: timed(e, system_prompt_batch(seed, s, n, lambda i: GateSpec(gate))),
            "chat_next_turn": lambda e, seed: chat_second_turns(e, seed, s, n),
        }
        for run in scenarios.values():  # warm-up (compiles, loads the adapters)
            for engine in engines.values():
                run(engine, 10_000)
        runs = {(name, on): [] for name in scenarios for on in engines}
        for repeat in range(args.repeats):
            for name, run in scenarios.items():
                for on, engine in engines.items():
                    runs[name, on].append(run(engine, repeat))
        for engine in engines.values():
            engine.close()
    rows, summary = [], {}
    for (name, on), results in runs.items():
        tps = statistics.median(r["tokens_per_s"] for r in results)
        rows.append({"scenario": name, "prefix_caching": "on" if on else "off", "tokens/s": f"{tps:.1f}",
                     "prompt tokens": results[0]["prompt_tokens"], "cached": results[0]["cached_tokens"],
                     "seconds": f"{statistics.median(r['seconds'] for r in results):.3f}"})
    for name in scenarios:
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[name, True], runs[name, False])]
        summary[f"prefix_cache_speedup_{name}"] = round(statistics.median(ratios), 2)
    print(f"device={device} dtype={dtype_name} size={size} batch={s['batch']} {n} repeats={args.repeats}")
    print_table(rows, [(k, "") for k in rows[0]])
    write_json(args.out, {"benchmark": "prefix_cache", "environment": environment(str(device)), "size": size,
                          "sizes": {**s, **n}, "dtype": dtype_name, "repeats": args.repeats,
                          "results": {f"{k[0]}/{'on' if k[1] else 'off'}": v for k, v in runs.items()}, **summary})
    print(f"wrote {args.out}")
    for key, value in summary.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
