"""The quick start: `scripts/serve.sh` (or `python -m deployments.main`).

Starts everything on one machine with embedded defaults: one embedded Valkey (unless
MOLORA_REDIS_URL is set) started before Ray so every replica shares it, local object storage
under the cache directory, the demo model with its adapters and gate router registered (unless
MOLORA_MODEL_PATH names another model), then Ray Serve on --host:--port. Prints how to call it
and stops everything on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from deployments.config import AppConfig


def _examples(base: str, model: str) -> str:
    return f"""
MoLoRA Serve is up at {base}   (Ctrl-C stops it)

  curl {base}/v1/models
  curl {base}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "math", "prompt": "Q: What is 2 + 3? A:", "max_tokens": 16, "temperature": 0}}'
  curl -N {base}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "molora:demo-gate", "messages": [{{"role": "user", "content": "def add(a, b):"}}], "stream": true}}'
  curl {base}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{model}", "prompt": "x = ", "adapters": [{{"name": "code", "weight": 0.7}}, {{"name": "math", "weight": 0.3}}]}}'
  curl {base}/metrics

  python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="unused")
print(client.completions.create(model="code", prompt="def add(a, b):", max_tokens=16).choices[0].text)
for chunk in client.chat.completions.create(model="molora:demo-gate", stream=True,
        messages=[{{"role": "user", "content": "What is 7 * 6?"}}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
PY
"""


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port, expected 1-65535 (--port or MOLORA_HTTP_PORT)")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.main", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("MOLORA_HTTP_HOST") or "127.0.0.1")
    # (a string default goes through `type` too, so a bad MOLORA_HTTP_PORT is an argparse error)
    parser.add_argument("--port", type=_port, default=os.environ.get("MOLORA_HTTP_PORT") or "8000",
                        help="HTTP port, 1-65535 (default: MOLORA_HTTP_PORT or 8000)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import ray
    from ray import serve

    from deployments import bootstrap
    from deployments.app import build_app

    def interrupt(*_):
        raise KeyboardInterrupt

    # During start-up a signal interrupts it (the finally below cleans up), even where the
    # parent made SIGINT ignored (a background job of a script).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    stop = threading.Event()
    cfg = AppConfig.from_sources({})
    try:
        print("preparing the model, the registry and the demo assets ...", flush=True)
        cfg = bootstrap.prepare(cfg)  # embedded Valkey (if needed) starts here, before Ray
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, namespace="molora",
                 log_to_driver=True, configure_logging=False)
        for sig in (signal.SIGINT, signal.SIGTERM):  # ray.init installed its own (fatal) handlers
            signal.signal(sig, interrupt)
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(cfg), name="molora", route_prefix="/", blocking=False)
        base = f"http://{args.host if args.host != '0.0.0.0' else '127.0.0.1'}:{args.port}"
        print(_examples(base, cfg.model_name), flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after Ray's start-up, which sets its own
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        print("\nstopping ...", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted, stopping ...", flush=True)
    finally:
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        bootstrap.stop_embedded_valkey()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
