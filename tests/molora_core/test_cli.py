"""`molora generate` streams to the terminal with an adapter, a mixture or a router."""

from __future__ import annotations

import shutil

import pytest
import torch

from molora_core.cli import main
from molora_core.demo import ensure_demo_assets
from molora_core.engine import Engine, EngineConfig, Request, SamplingParams
from molora_core.peft_io import load_peft_adapter
from molora_core.routing import AdapterSpec, GateRouter


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    return ensure_demo_assets(tmp_path_factory.getbasetemp() / "demo-assets")


@pytest.mark.parametrize(
    "routing", [[], ["--adapter", "math"], ["--mixture", "math:0.6,chat:0.4"], ["--router", "demo-gate"]],
    ids=["base", "adapter", "mixture", "router"],
)
def test_generate_streams_text(demo, capsys, routing):
    prompt = "Q: What is 2 + 3? A:"
    argv = ["generate", "--model", str(demo / "model"), "--prompt", prompt, "--max-tokens", "8", *routing]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "8 tokens" in captured.err or "finish_reason=stop" in captured.err
    if routing[:1] == ["--adapter"]:
        engine = Engine(demo / "model", EngineConfig(max_batch=1, hot_slots=1, max_rank=8),
                        adapter_loader=lambda n: load_peft_adapter(demo / "adapters" / n))
        want = engine.submit(Request(prompt, SamplingParams(max_tokens=8), AdapterSpec("math"))).result().text
        assert captured.out == want + "\n"
        penalised = SamplingParams(max_tokens=8, presence_penalty=0.5, frequency_penalty=1.5)
        want = engine.submit(Request(prompt, penalised, AdapterSpec("math"))).result().text
        assert main([*argv, "--presence-penalty", "0.5", "--frequency-penalty", "1.5"]) == 0
        assert capsys.readouterr().out == want + "\n"


def test_generate_reports_bad_input(demo, capsys):
    assert main(["generate", "--model", str(demo / "model"), "--prompt", "x", "--adapter", "missing"]) == 2
    assert "adapter 'missing'" in capsys.readouterr().err
    assert main(["generate", "--model", str(demo / "model"), "--prompt", "x", "--mixture", "math"]) == 2
    capsys.readouterr()
    assert main(["generate", "--model", str(demo / "model"), "--prompt", "x", "--frequency-penalty", "3"]) == 2
    assert "frequency_penalty=3.0" in capsys.readouterr().err

    for flag in ("--adapter", "--mixture", "--router"):  # an empty value (an unset variable) is not the base model
        assert main(["generate", "--model", str(demo / "model"), "--prompt", "x", flag, ""]) == 2
        assert f"{flag} is empty" in capsys.readouterr().err
    for weight in ("nan", "inf"):
        assert main(["generate", "--model", str(demo / "model"), "--prompt", "x", "--mixture",
                     f"math:{weight},chat:0.5"]) == 2
        assert "must be finite" in capsys.readouterr().err
    devices = {"bogus": "is not a device torch knows"}
    if not torch.cuda.is_available():
        devices["cuda"] = "torch sees no CUDA device"
    for device, message in devices.items():
        assert main(["generate", "--model", str(demo / "model"), "--prompt", "x", "--device", device]) == 2
        assert message in capsys.readouterr().err


def test_generate_keeps_adapters_whose_directories_share_a_name_apart(demo, tmp_path, capsys):
    for run, name in (("a", "math"), ("b", "chat")):
        shutil.copytree(demo / "adapters" / name, tmp_path / run / "final")
    argv = ["generate", "--model", str(demo / "model"), "--prompt", "Q: What is 2 + 3? A:", "--max-tokens", "6"]
    assert main([*argv, "--mixture", "math:0.6,chat:0.4"]) == 0
    want = capsys.readouterr().out
    assert main([*argv, "--mixture", f"{tmp_path}/a/final:0.6,{tmp_path}/b/final:0.4"]) == 0
    assert capsys.readouterr().out == want


def test_generate_sizes_the_hot_set_for_a_router_over_more_adapters(demo, tmp_path, capsys):
    adapters = tmp_path / "adapters"
    for name in ("code", "math", "chat", "multilingual"):
        shutil.copytree(demo / "adapters" / name, adapters / name)
    shutil.copytree(demo / "adapters" / "math", adapters / "math2")
    hidden = GateRouter.load(demo / "routers" / "demo-gate").gate.weight.shape[1]
    torch.manual_seed(0)
    GateRouter(hidden, ["code", "math", "chat", "multilingual", "math2"], top_k=2).save(tmp_path / "gate5")
    assert main(["generate", "--model", str(demo / "model"), "--prompt", "x", "--max-tokens", "3",
                 "--router", str(tmp_path / "gate5"), "--adapters-dir", str(adapters)]) == 0, capsys.readouterr().err
