"""The `molora` command line: make the demo assets, and run offline generation.

    molora demo-assets [DIR]
    molora generate --prompt "Q: What is 2 + 3? A:" --adapter math
    molora generate --model DIR --router demo-gate --prompt "..." --max-tokens 64
    molora generate --mixture math:0.7,chat:0.3 --prompt "..."

With no --model, generate uses the demo assets under $MOLORA_CACHE_DIR/demo (default
~/.cache/molora/demo), making them first if needed. Adapter and router names resolve to
directories: a path as given, else <model>/../adapters/<name> and <model>/../routers/<name>
(the demo layout), or --adapters-dir / --routers-dir.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from molora_core.errors import MoLoRAError


def default_demo_dir() -> Path:
    return Path(os.environ.get("MOLORA_CACHE_DIR", "~/.cache/molora")).expanduser() / "demo"


def _cmd_demo_assets(args) -> int:
    from molora_core.demo import make_demo_assets

    started = time.perf_counter()
    directory = args.dir or default_demo_dir()
    try:
        root = make_demo_assets(directory)
    except OSError as e:
        raise MoLoRAError(f"cannot write demo assets to {directory}: {e}") from None
    print(f"demo assets written to {root} in {time.perf_counter() - started:.1f}s")
    return 0


def _resolve(name: str, search: Path | None, kind: str) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if search is not None and (search / name).is_dir():
        return search / name
    raise MoLoRAError(f"{kind} {name!r} is neither a directory nor found under {search}")


def _parse_mixture(text: str) -> tuple[list[str], list[float]]:
    names, weights = [], []
    for part in text.split(","):
        name, sep, weight = part.rpartition(":")
        if not sep or not name:
            raise MoLoRAError(f"--mixture part {part!r} is not NAME:WEIGHT")
        try:
            weights.append(float(weight))
        except ValueError:
            raise MoLoRAError(f"--mixture weight {weight!r} of {name!r} is not a number") from None
        names.append(name)
    return names, weights


def _cmd_generate(args) -> int:
    from molora_core.demo import ensure_demo_assets
    from molora_core.engine import Engine, EngineConfig, Request, RouterSpec, SamplingParams
    from molora_core.peft_io import load_peft_adapter
    from molora_core.routing import AdapterSpec, BaseSpec, GateRouter, MixtureSpec

    model_dir = Path(args.model).expanduser() if args.model else ensure_demo_assets(default_demo_dir()) / "model"
    adapters_dir = Path(args.adapters_dir) if args.adapters_dir else model_dir.parent / "adapters"
    routers_dir = Path(args.routers_dir) if args.routers_dir else model_dir.parent / "routers"
    given = {flag: value for flag, value in (("--adapter", args.adapter), ("--mixture", args.mixture),
                                              ("--router", args.router)) if value is not None}
    if len(given) > 1:
        raise MoLoRAError("give at most one of --adapter, --mixture, --router")
    empty = [flag for flag, value in given.items() if not value.strip()]
    if empty:
        raise MoLoRAError(f"{empty[0]} is empty; name an adapter (or router), or leave the flag out for the base model")
    # An adapter's name in the engine is its directory's path, so two adapters whose directories
    # share a name (runs/a/final, runs/b/final) stay two; one given twice is still refused.
    paths: dict[str, Path] = {}

    def key(name: str) -> str:
        path = _resolve(name, adapters_dir, "adapter").resolve()
        paths[str(path)] = path
        return str(path)

    routers: dict[str, GateRouter] = {}
    if args.adapter:
        routing, names = AdapterSpec(key(args.adapter)), 1
    elif args.mixture:
        mixture, weights = _parse_mixture(args.mixture)
        routing, names = MixtureSpec(tuple(key(n) for n in mixture), tuple(weights)), len(mixture)
    elif args.router:
        router_path = str(_resolve(args.router, routers_dir, "router"))
        routers[router_path] = GateRouter.load(router_path)
        routing, names = RouterSpec(router_path), len(routers[router_path].adapters)
    else:
        routing, names = BaseSpec(), 0

    def adapter_loader(name: str):
        path = paths.get(name) or _resolve(name, adapters_dir, "adapter")
        return load_peft_adapter(path, name=name)

    config = EngineConfig(  # one request: a hot-set slot for each adapter its routing names
        max_batch=1, max_seq_len=args.max_seq_len, hot_slots=max(4, args.max_top_k, names), max_rank=args.max_rank,
        max_top_k=args.max_top_k, device=args.device, dtype=args.dtype,
    )
    engine = Engine(model_dir, config, adapter_loader=adapter_loader,
                    router_loader=lambda name: routers.get(name) or GateRouter.load(name))
    sampling = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        max_tokens=args.max_tokens, min_tokens=args.min_tokens, stop=tuple(args.stop or ()),
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
    )
    started = time.perf_counter()
    handle = engine.submit(Request(args.prompt, sampling, routing))
    if args.echo:
        sys.stdout.write(args.prompt)
    for delta in handle:
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    out = handle.output()
    elapsed = time.perf_counter() - started
    sys.stdout.write("\n")
    print(
        f"[{out.completion_tokens} tokens, {out.prompt_tokens} prompt tokens, finish_reason={out.finish_reason}, "
        f"{out.completion_tokens / max(elapsed, 1e-9):.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molora", description="MoLoRA Serve: per-token LoRA routing.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-assets", help="make the demo model, tokenizer, adapters and router (no download)")
    demo.add_argument("dir", nargs="?", help=f"output directory (default {default_demo_dir()})")
    demo.set_defaults(func=_cmd_demo_assets)

    gen = sub.add_parser("generate", help="offline generation, streamed to the terminal")
    gen.add_argument("--model", help="model directory (default: the demo model, made if missing)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--adapter", help="one adapter: a PEFT directory or a name under --adapters-dir")
    gen.add_argument("--mixture", help="fixed mixture NAME:WEIGHT,NAME:WEIGHT")
    gen.add_argument("--router", help="gate router: a directory or a name under --routers-dir")
    gen.add_argument("--adapters-dir", help="where adapter names resolve (default <model>/../adapters)")
    gen.add_argument("--routers-dir", help="where router names resolve (default <model>/../routers)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--min-tokens", type=int, default=0, help="tokens before EOS or a stop can end the output")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--presence-penalty", type=float, default=0.0, help="-2 to 2, as OpenAI's")
    gen.add_argument("--frequency-penalty", type=float, default=0.0, help="-2 to 2, as OpenAI's")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="(0, 10], as transformers'")
    gen.add_argument("--echo", action="store_true", help="print the prompt before the output")
    gen.add_argument("--max-seq-len", type=int, default=1024)
    gen.add_argument("--max-rank", type=int, default=64)
    gen.add_argument("--max-top-k", type=int, default=4)
    gen.add_argument("--device")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (MoLoRAError, ValueError) as exc:
        print(f"molora: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
