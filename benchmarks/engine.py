"""Engine benchmark: offline generation throughput and per-step latency, against transformers + PEFT.

A batch of requests with (a) no adapters, (b) one adapter per request across 4 adapters, (c)
per-token gate routing (top-2) over the same 4 adapters, through our engine; and the baseline a
user of this stack would pick today: transformers + PEFT `generate` on the same mixed-adapter
batch (`adapter_names=`), same model, prompts and lengths, greedy, no EOS stop.

The model (Qwen3 architecture) and the rank-16 adapters are random (made locally, no download):
throughput does not depend on the weights' values.

    .venv/bin/python benchmarks/engine.py --quick          # CPU sizes (hidden 256)
    .venv/bin/python benchmarks/engine.py --size qwen3-0.6b-layers   # CPU, real layer shapes
    python benchmarks/engine.py                             # GPU sizes

Every scenario (and the PEFT baseline) runs `--repeats` times, interleaved, so a slow spell of
a shared machine hits them all alike; each row is the run with the median throughput.

Each run also counts the process's voluntary context switches (`context_switches`): in a run of
small CPU ops, thousands of them mean OpenMP workers sleeping and waking between ops (see
`molora_core.cpu_threads`), not work. And its minor page faults (`page_faults`): thousands mean
freed temporaries handed back to the kernel and faulted in again (see `molora_core.cpu_memory`).
And the cyclic garbage collector's passes per generation (`gc_passes`) and their pause
(`gc_ms`): a full pass (generation 2) stops the step loop while it walks every object the process
holds (in a CPU engine process of the quick size, 416k objects and 330-380 ms on the 2-core VM).
And the CPU seconds of all its threads (`cpu_seconds`; the `cpu/wall` column): on a GPU a run
that launches from one thread reads about 1, so more means other threads were busy meanwhile
(OpenMP workers spinning on the cores the launching thread shares, for one); and the step
thread's own (`thread_cpu_seconds`, the `step thr` column, per second of wall): below 1 it was
off the CPU part of the run, waiting (on a lock, the GIL, a blocking device sync) or, where the
`preempt` column (`involuntary_switches`) climbs, preempted; `throttled_ms` (the `thrtl ms`
column) is the time the cgroup's CPU quota held the process's threads back, where readable;
`steal_ms` (`steal ms`) is the machine's CPU time its hypervisor gave to others (all CPUs).
The environment records the CPUs the process may use and its quota (`affinity_cpus`,
`quota_cpus`). `--profile` also writes a timeline of one prefill per scenario, host and device,
layer by layer.

Prints a table, writes JSON (device, versions, command), prints each ratio repeat by repeat
(runs back to back, so a slow spell of the machine moves both sides), and ends with
``vs_peft_throughput: <(b) ours / PEFT>`` and ``molora_vs_base_throughput: <(c) / (a)>``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cpu_steal_ms, cpu_throttling, environment, write_json  # noqa: E402
from kernels.backends import TritonBackend  # noqa: E402
from molora_core.engine import Engine, EngineConfig, Request, SamplingParams  # noqa: E402
from molora_core.engine.stats import percentile  # noqa: E402
from molora_core.lora_layer import TARGET_MODULES  # noqa: E402
from molora_core.model import load_pretrained  # noqa: E402
from molora_core.peft_io import load_peft_adapter  # noqa: E402
from molora_core.routing import AdapterSpec, BaseSpec, GateRouter, GateSpec  # noqa: E402

SIZES = {
    # hidden, layers, heads, kv heads, intermediate, vocab, batch, prompt, new tokens
    "quick": dict(hidden=256, layers=4, heads=4, kv=2, inter=768, vocab=4096, batch=16, prompt=32, new=32),
    # Qwen3-0.6B's layer shapes (head_dim 128) with 4 of its 28 layers and an 8k vocabulary: on
    # CPU in about a minute, with a rank-16 adapter as small next to its layer as in practice
    # (at hidden 256, four rank-16 adapters weigh 29% of the base layers, which caps (c)/(a)
    # near 0.77 on a memory-bound machine whatever the implementation).
    "qwen3-0.6b-layers": dict(hidden=1024, layers=4, heads=16, kv=8, head_dim=128, inter=3072, vocab=8192,
                              batch=16, prompt=32, new=32),
    "full": dict(hidden=1024, layers=28, heads=16, kv=8, inter=3072, vocab=32768, batch=16, prompt=256, new=128),
}
NUM_ADAPTERS, RANK = 4, 16


def save_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over exactly the model's vocabulary (the engine detokenizes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(path)


def make_assets(root: Path, s: dict, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv"], head_dim=s.get("head_dim", s["hidden"] // s["heads"]),
        max_position_embeddings=4096, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).eval()
    model.save_pretrained(root / "model")
    save_word_tokenizer(root / "model", s["vocab"])
    for i in range(NUM_ADAPTERS):
        torch.manual_seed(100 + i)
        lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGET_MODULES), init_lora_weights=False)
        get_peft_model(copy.deepcopy(model), lora).save_pretrained(str(root / f"a{i}"))
    return model


def requests(s: dict, routing_of) -> list[Request]:
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, s["vocab"], (s["batch"], s["prompt"]), generator=gen).tolist()
    sampling = SamplingParams(max_tokens=s["new"], ignore_eos=True)
    return [Request(p, sampling, routing_of(i)) for i, p in enumerate(prompts)]


def run_ours(engine: Engine, make_requests: Callable[[], list[Request]], warmups: int = 1) -> dict:
    # Warm-up on the whole batch (`warmups` times): on a GPU the first run at a shape compiles Triton kernels
    # (prefill tile heights) and captures the gate's decode graphs, which a timed run should not hold.
    # The batch is made twice, not deep-copied: the engine keys a gate's graphs by the router
    # object, so a copied gate's warm-up left the first timed run to capture them all again.
    for _ in range(warmups):
        engine.generate(make_requests())
    reqs = make_requests()
    engine.counters.step_s.clear()
    before = _process_counters()
    started = time.perf_counter()
    outs = engine.generate(reqs)
    wall = time.perf_counter() - started
    counters = _process_counters(before)
    tokens = sum(o.completion_tokens for o in outs)
    steps = list(engine.counters.step_s)
    # The first step prefills the whole batch (max_step_tokens holds every prompt); what the
    # steps' sum leaves of the wall time is the engine's host work between steps.
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "step_p50_ms": 1e3 * percentile(steps, 50), "step_p99_ms": 1e3 * percentile(steps, 99), "steps": len(steps),
            "first_step_ms": 1e3 * steps[0], "between_steps_ms": 1e3 * (wall - sum(steps)),
            **counters}


def _paired(runs: dict, numerator: str, denominator: str) -> list[float]:
    """numerator's tokens/s over denominator's, repeat by repeat."""
    return [n["tokens_per_s"] / d["tokens_per_s"] for n, d in zip(runs[numerator], runs[denominator])]


class _GcPauses:
    """A gc callback: the collector's passes and their seconds, per generation, since installed."""

    def __init__(self) -> None:
        self.passes, self.seconds, self._started = [0, 0, 0], [0.0, 0.0, 0.0], 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.passes[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self._started


GC_PAUSES = _GcPauses()  # in gc.callbacks from the first _process_counters() on


def _process_counters(before: dict | None = None) -> dict:
    """This process's context switches (voluntary: a thread waited; involuntary: one was
    preempted), minor page faults, CPU seconds (every thread's, and the calling thread's own:
    the step thread's in these runs, whose steps run on the thread that consumes them), the
    cgroup's CPU throttling and the machine's hypervisor steal where they can be read, and the
    garbage collector's passes per generation and pause: so far, or since `before` (an earlier
    value of this)."""
    if GC_PAUSES not in gc.callbacks:
        gc.callbacks.append(GC_PAUSES)
    usage, steal = resource.getrusage(resource.RUSAGE_SELF), cpu_steal_ms()
    now = {"context_switches": usage.ru_nvcsw, "involuntary_switches": usage.ru_nivcsw, "page_faults": usage.ru_minflt,
           "gc_passes": list(GC_PAUSES.passes), "gc_ms": 1e3 * sum(GC_PAUSES.seconds),
           "cpu_seconds": usage.ru_utime + usage.ru_stime, "thread_cpu_seconds": time.thread_time(),
           **(cpu_throttling() or {}), **({} if steal is None else {"steal_ms": steal})}
    if before is None:
        return now
    return {key: ([n - b for n, b in zip(value, before[key])] if isinstance(value, list) else value - before[key])
            for key, value in now.items() if key in before}


def _thread_cpu_ms() -> dict[int, tuple[str, float]]:
    """Each of this process's threads' CPU time so far: thread id -> (name, ms), from
    /proc/self/task/*/schedstat (nanoseconds); {} where there is no such file."""
    threads = {}
    for task in Path("/proc/self/task").glob("*"):
        try:
            threads[int(task.name)] = ((task / "comm").read_text().strip(),
                                       int((task / "schedstat").read_text().split()[0]) / 1e6)
        except (OSError, ValueError, IndexError):
            continue  # (a thread that ended meanwhile)
    return threads


def _busy_threads(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], limit: int = 8) -> str:
    """The threads that ran at least 1 ms between two `_thread_cpu_ms()` readings, busiest first,
    this one marked `step`: whether other threads (OpenMP workers spinning, a loader) shared
    the CPUs while the step ran."""
    me = threading.get_native_id()
    used = sorted(((ms - before.get(tid, (name, 0.0))[1], tid, name) for tid, (name, ms) in after.items()),
                  reverse=True)
    busy = [f"{name}{' (step)' if tid == me else ''} {ms:.1f}" for ms, tid, name in used if ms >= 1.0]
    more = f" and {len(busy) - limit} more" if len(busy) > limit else ""
    return (", ".join(busy[:limit]) + more) if busy else "none"


# Host calls that wait for the device (or read a device value back): in an eager step each one
# stops the host queueing launches until the device has caught up.
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
               "aten::item")


def profile_scenarios(scenarios: dict, s: dict, device: torch.device, path: str) -> None:
    """Per scenario, the ops with the most self time (device time on CUDA) over its prefill
    alone and over a whole run, as torch.profiler tables in one text file; for the prefill on
    CUDA also the ops with the most host time, and per part the count of each SYNC_EVENTS call;
    then the prefill's wall times and its Python by host time (`_prefill_host_profile`)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    tables = []
    for name, (ours, routing) in scenarios.items():
        for part, new in (("prefill (max_tokens=1)", 1), ("whole run", s["new"])):
            ours.generate(requests({**s, "new": new}, routing))  # this length's shapes warm, as in the timed runs
            reqs = requests({**s, "new": new}, routing)
            with profile(activities=activities) as prof:
                ours.generate(reqs)
                if cuda:
                    torch.cuda.synchronize()
            events = prof.key_averages()
            calls = {e.key: e.count for e in events}
            syncs = ", ".join(f"{key} {calls.get(key, 0)}" for key in SYNC_EVENTS)
            tables.append(f"== {name}: {part}\nhost syncs: {syncs}\n{events.table(sort_by=sort_by, row_limit=20)}")
            if cuda and new == 1:
                tables.append(f"== {name}: {part}, by host time\n"
                              f"{events.table(sort_by='self_cpu_time_total', row_limit=20)}")
        prefill_requests = functools.partial(requests, {**s, "new": 1}, routing)
        tables.append(_prefill_host_profile(name, ours, prefill_requests, cuda))
        tables.append(_prefill_timeline(name, ours, prefill_requests, cuda))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(tables))
    print(f"wrote {path}")


def _prefill_host_profile(name: str, engine: Engine, make_requests: Callable[[], list[Request]], cuda: bool,
                          runs: int = 5) -> str:
    """The prefill alone (max_tokens=1): its wall time over `runs` unprofiled runs, then the
    Python functions with the most host time in one run under cProfile (where torch.profiler
    sees only ops, this sees the launchers' and the engine's own Python), as text."""
    import cProfile
    import io
    import pstats

    def once(batch: list[Request]) -> float:
        started = time.perf_counter()
        engine.generate(batch)
        if cuda:
            torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - started)

    walls = sorted(once(make_requests()) for _ in range(runs))
    profiler = cProfile.Profile()
    profiler.runcall(once, make_requests())
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
    stats.print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    return (f"== {name}: prefill (max_tokens=1), host Python (cProfile)\n"
            f"prefill wall ms, {runs} unprofiled runs: " + " ".join(f"{w:.1f}" for w in walls) + f"\n{text.getvalue()}")


def _prefill_timeline(name: str, engine: Engine, make_requests: Callable[[], list[Request]], cuda: bool) -> str:
    """One unprofiled prefill (max_tokens=1), marked before the embedding, before each decoder
    layer and before the LM head: when the host reached each mark (ms from the generate call)
    and, on a GPU, when the device did (a CUDA event recorded there). A device column far behind
    the host's means the host ran ahead (device-bound); one that keeps pace means the device
    waited on the host, and the rows say from where. The gate routes and the dispatch metadata
    are built between `embed` and `layer 0`. Then the run's host counters (wall; the step
    thread's CPU and every thread's; context switches; cgroup throttling; the busiest threads)
    and, on a GPU, where a second run synchronized with the device (torch.cuda's sync debug
    mode)."""
    import warnings
    from collections import Counter

    model = engine.model
    marks: list[tuple[str, float, torch.cuda.Event | None]] = []

    def mark(label: str):
        event = torch.cuda.Event(enable_timing=True) if cuda else None
        if event is not None:
            event.record()
        marks.append((label, time.perf_counter(), event))

    layers = [(f"layer {i}", layer) for i, layer in enumerate(model.model.layers)]
    modules = [("embed", model.model.embed_tokens), *layers, ("lm_head", model.lm_head)]
    hooks = [module.register_forward_pre_hook(lambda *_, label=label: mark(label)) for label, module in modules]
    try:
        batch = make_requests()
        before, threads_before = _process_counters(), _thread_cpu_ms()
        mark("generate")
        engine.generate(batch)
        mark("returned")
        if cuda:
            torch.cuda.synchronize()
        counters, threads = _process_counters(before), _busy_threads(threads_before, _thread_cpu_ms())
        wall = 1e3 * (time.perf_counter() - marks[0][1])
    finally:
        for hook in hooks:
            hook.remove()
    start, start_event = marks[0][1], marks[0][2]
    lines = [f"== {name}: prefill (max_tokens=1), timeline of one unprofiled run (ms from the generate call)",
             f"{'mark':<10}{'host':>9}{'+host':>8}" + (f"{'device':>9}{'+device':>8}" if cuda else "")]
    prev_host = prev_device = 0.0
    for label, host, event in marks:
        host = 1e3 * (host - start)
        row = f"{label:<10}{host:>9.2f}{host - prev_host:>8.2f}"
        if event is not None:
            device = start_event.elapsed_time(event)
            row += f"{device:>9.2f}{device - prev_device:>8.2f}"
            prev_device = device
        lines.append(row)
        prev_host = host
    c = counters
    lines.append(f"wall {wall:.1f} ms (to the device's end); step thread CPU {1e3 * c['thread_cpu_seconds']:.1f} ms, "
                 f"every thread's {1e3 * c['cpu_seconds']:.1f} ms; context switches {c['context_switches']} voluntary, "
                 f"{c['involuntary_switches']} involuntary; gc passes {c['gc_passes']} ({c['gc_ms']:.1f} ms); cgroup "
                 + (f"throttled {c['throttled_periods']} periods, {c['throttled_ms']:.1f} ms" if "throttled_ms" in c
                    else "throttling not readable")
                 + ("" if "steal_ms" not in c else f"; hypervisor steal {c['steal_ms']:.0f} ms"))
    lines.append(f"threads on a CPU for 1 ms or more (ms): {threads}")
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.generate(make_requests())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        where = Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
        lines.append("device syncs of a second run, by caller: "
                     + (", ".join(f"{site} x{n}" for site, n in where.most_common(12)) or "none"))
    return "\n".join(lines) + "\n"


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (the lower middle one of an even count), plus every
    run's throughput."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "runs_tokens_per_s": [r["tokens_per_s"] for r in runs],
            # each run's decode step and prefill, in run order: where a trend over repeats comes from
            **{f"runs_{key}": [r[key] for r in runs] for key in ("step_p50_ms", "first_step_ms") if key in runs[0]}}


def peft_runner(root: Path, s: dict, device, dtype):
    """A function that runs the PEFT baseline once (model loaded and warmed up here)."""
    from peft import PeftModel
    from transformers import Qwen3ForCausalLM

    base = Qwen3ForCausalLM.from_pretrained(root / "model", dtype=dtype).to(device).eval()
    model = PeftModel.from_pretrained(base, str(root / "a0"), adapter_name="a0")
    for i in range(1, NUM_ADAPTERS):
        model.load_adapter(str(root / f"a{i}"), adapter_name=f"a{i}")
    model.eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["prompt"]), generator=gen).to(device)
    names = [f"a{i % NUM_ADAPTERS}" for i in range(s["batch"])]

    def once(n_new, batch_ids, batch_names):
        with torch.inference_mode():
            return model.generate(batch_ids, attention_mask=torch.ones_like(batch_ids), adapter_names=batch_names,
                                  max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)

    once(2, ids[:2], names[:2])  # warm-up

    def run() -> dict:
        if device.type == "cuda":
            torch.cuda.synchronize()
        before = _process_counters()
        started = time.perf_counter()
        out = once(s["new"], ids, names)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
        tokens = (out.shape[1] - ids.shape[1]) * out.shape[0]
        return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
                "step_mean_ms": 1e3 * wall / (out.shape[1] - ids.shape[1]),
                **_process_counters(before)}

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU sizes (same as --size quick)")
    parser.add_argument("--size", choices=sorted(SIZES), help="model and batch sizes (default: full)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per scenario (median kept)")
    parser.add_argument("--warmups", type=int, default=1, help="untimed runs of the batch before each timed one")
    parser.add_argument("--compare-decode", default="", metavar="KERNELS",
                        help="comma-separated decode kernels (split, fused, dense, dense_base) to also run (b) and "
                             "(c) with, each on a second engine whose Triton backend uses that kernel in decode steps")
    parser.add_argument("--compare-prefill", default="", metavar="KERNELS",
                        help="comma-separated prefill kernels (grouped, dense) to also run (b) and (c) with, each on "
                             "a second engine whose Triton backend uses that kernel in prefill steps")
    parser.add_argument("--skip-peft", action="store_true",
                        help="leave out the transformers + PEFT baseline (slow at full size); no vs_peft_throughput")
    parser.add_argument("--profile", metavar="PATH",
                        help="after the timed runs, profile each of our scenarios once (torch.profiler, CUDA "
                             "activity too on a GPU): its prefill alone (max_tokens=1) and its whole run; the "
                             "top ops by self time (and on a GPU, for the prefill, by host time), the count "
                             "of host syncs, and the prefill's wall times and Python functions by host time "
                             "(cProfile) go to PATH")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "engine.json"))
    args = parser.parse_args()
    size = args.size or ("quick" if args.quick else "full")
    s = dict(SIZES[size])
    if args.batch:
        s["batch"] = args.batch
    # (step, kernel, scenario suffix) of each second engine, whose `{step}_kernel` is `kernel`
    compare = []
    for step, given, choices in (("decode", args.compare_decode, TritonBackend.DECODE_KERNELS),
                                 ("prefill", args.compare_prefill, TritonBackend.PREFILL_KERNELS)):
        kernels = [k for k in given.split(",") if k]
        known = [k for k in choices if k != "auto"]
        if set(kernels) - set(known):
            parser.error(f"--compare-{step}: unknown kernels {sorted(set(kernels) - set(known))}; choose from {known}")
        compare += [(step, k, k if step == "decode" else f"prefill_{k}") for k in kernels]
    device = torch.device(args.device)
    if compare and device.type != "cuda":
        parser.error("--compare-decode and --compare-prefill compare the Triton backend's kernels: they need a CUDA "
                     "device")
    dtype_name = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    dtype = getattr(torch, dtype_name)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_assets(root, s, dtype)
        loaded = load_pretrained(root / "model", dtype_name, device)
        config = EngineConfig(max_batch=s["batch"], max_seq_len=s["prompt"] + s["new"] + 8, hot_slots=NUM_ADAPTERS,
                              max_rank=RANK, max_top_k=2, prefill_chunk=max(256, s["prompt"]),
                              max_step_tokens=s["batch"] * (s["prompt"] + 1), max_queue=4 * s["batch"],
                              # Every repeat runs the same prompts: with the prefix cache on, all but
                              # the first would skip their prefill, which transformers + PEFT runs.
                              prefix_caching=False)
        loader = lambda name: load_peft_adapter(root / name, name=name)  # noqa: E731
        engine = Engine(loaded, config, adapter_loader=loader)
        torch.manual_seed(7)
        gate = GateRouter(s["hidden"], [f"a{i}" for i in range(NUM_ADAPTERS)], top_k=2).to(device)
        scenarios = {
            "a_base": (engine, lambda i: BaseSpec()),
            "b_adapter_per_request": (engine, lambda i: AdapterSpec(f"a{i % NUM_ADAPTERS}")),
            "c_gate_per_token": (engine, lambda i: GateSpec(gate)),
        }
        for step, kernel, suffix in compare:  # a second engine whose steps run LoRA with `kernel`: an A/B in one run
            other = Engine(load_pretrained(root / "model", dtype_name, device),
                           config.model_copy(update={f"{step}_kernel": kernel}), adapter_loader=loader)
            scenarios[f"b_adapter_per_request_{suffix}"] = (other, scenarios["b_adapter_per_request"][1])
            scenarios[f"c_gate_per_token_{suffix}"] = (other, scenarios["c_gate_per_token"][1])
        peft = None if args.skip_peft else peft_runner(root, s, device, dtype)
        runs = {name: [] for name in [*scenarios, *(["peft_mixed_adapter_names"] if peft else [])]}
        for _ in range(args.repeats):
            for name, (ours, routing) in scenarios.items():
                runs[name].append(run_ours(ours, functools.partial(requests, s, routing), args.warmups))
            if peft:
                runs["peft_mixed_adapter_names"].append(peft())
        results = {name: median_run(r) for name, r in runs.items()}
        if args.profile:
            profile_scenarios(scenarios, s, device, args.profile)

    print(f"device={device} dtype={dtype_name} batch={s['batch']} prompt={s['prompt']} new={s['new']} "
          f"hidden={s['hidden']} layers={s['layers']} rank={RANK} adapters={NUM_ADAPTERS} "
          f"repeats={args.repeats} warmups={args.warmups} (median run shown)")
    print(f"{'scenario':<36}{'tokens/s':>12}{'step p50 ms':>14}{'step p99 ms':>14}{'prefill ms':>12}{'between ms':>12}"
          f"{'ctx sw':>8}{'preempt':>8}{'faults':>8}{'gc ms':>8}{'cpu/wall':>10}{'step thr':>10}{'thrtl ms':>10}")
    na = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for name, r in results.items():
        p50 = r.get("step_p50_ms", r.get("step_mean_ms"))
        print(f"{name:<36}{r['tokens_per_s']:>12.1f}{p50:>14.2f}{na(r.get('step_p99_ms')):>14}"
              f"{na(r.get('first_step_ms')):>12}{na(r.get('between_steps_ms')):>12}{r['context_switches']:>8}"
              f"{r['involuntary_switches']:>8}{r['page_faults']:>8}{r['gc_ms']:>8.1f}"
              f"{r['cpu_seconds'] / r['seconds']:>10.2f}{r['thread_cpu_seconds'] / r['seconds']:>10.2f}"
              f"{na(r.get('throttled_ms')):>10}{na(r.get('steal_ms')):>10}")
    vs_peft = None if peft is None else (
        results["b_adapter_per_request"]["tokens_per_s"] / results["peft_mixed_adapter_names"]["tokens_per_s"])
    vs_base = results["c_gate_per_token"]["tokens_per_s"] / results["a_base"]["tokens_per_s"]
    # The same ratios within each repeat, whose runs were back to back: on a machine whose speed
    # drifts between repeats they vary less than the ratio of two medians taken from different ones.
    per_repeat = {"molora_vs_base_throughput": _paired(runs, "c_gate_per_token", "a_base")}
    if peft:
        per_repeat["vs_peft_throughput"] = _paired(runs, "b_adapter_per_request", "peft_mixed_adapter_names")
    report = {
        "benchmark": "engine",
        "environment": environment(str(device)),
        "size": size, "sizes": s, "dtype": dtype_name, "repeats": args.repeats, "warmups": args.warmups,
        "results": results,
        "vs_peft_throughput": vs_peft, "molora_vs_base_throughput": vs_base, "per_repeat": per_repeat,
        "notes": "PEFT step latency is the mean per generated token (generate exposes no per-step timing)",
    }
    for step, kernel, suffix in compare:
        report[f"molora_vs_base_throughput_{kernel}_{step}"] = (
            results[f"c_gate_per_token_{suffix}"]["tokens_per_s"] / results["a_base"]["tokens_per_s"])
    write_json(args.out, report)
    print(f"wrote {args.out}")
    for key, ratios in per_repeat.items():
        print(f"{key} per repeat: " + " ".join(f"{r:.2f}" for r in ratios))
    for name, r in results.items():
        if "runs_step_p50_ms" in r:
            print(f"{name} per repeat: tokens/s " + " ".join(f"{v:.0f}" for v in r["runs_tokens_per_s"])
                  + "; decode step p50 ms " + " ".join(f"{v:.2f}" for v in r["runs_step_p50_ms"])
                  + "; prefill ms " + " ".join(f"{v:.1f}" for v in r["runs_first_step_ms"]))
    print("vs_peft_throughput: " + ("n/a (--skip-peft)" if vs_peft is None else f"{vs_peft:.2f}"))
    for step, kernel, _ in compare:
        key = f"molora_vs_base_throughput_{kernel}_{step}"
        print(f"{key}: {report[key]:.2f}")
    print(f"molora_vs_base_throughput: {vs_base:.2f}")


if __name__ == "__main__":
    main()
