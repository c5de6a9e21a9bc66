"""Demo assets: deterministic bytes, small, and readable by our loader, transformers and PEFT."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from molora_core.cli import main
from molora_core.demo import ADAPTERS, ROUTER, demo_assets_present, ensure_demo_assets, make_demo_assets
from molora_core.model import load_pretrained
from molora_core.peft_io import load_peft_adapter
from molora_core.routing import GateRouter


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    return ensure_demo_assets(tmp_path_factory.getbasetemp() / "demo-assets")


def tree_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_assets_are_deterministic_and_small(demo, tmp_path, capsys):
    assert main(["demo-assets", str(tmp_path / "again")]) == 0  # the CLI builds a second copy
    assert "demo assets written" in capsys.readouterr().out
    first, second = tree_hashes(demo), tree_hashes(tmp_path / "again")
    assert first == second
    manifest = json.loads((demo / "manifest.json").read_text())
    assert {k: v for k, v in first.items() if k != "manifest.json"} == manifest["sha256"]
    size = sum(p.stat().st_size for p in demo.rglob("*") if p.is_file())
    assert size < 8 << 20, f"demo assets take {size} bytes"


def test_demo_assets_load_everywhere(demo):
    from peft import PeftModel
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    loaded = load_pretrained(demo / "model")
    assert loaded.config.architecture == "Qwen3ForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(demo / "model")
    text = "Grüße 日本語 🙂 def f(x): return x + 1"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: lossless
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    hf = Qwen3ForCausalLM.from_pretrained(demo / "model").eval()
    with torch.no_grad():
        base_logits = hf(ids).logits
        torch.testing.assert_close(loaded.model.forward_dense(ids), base_logits, atol=1e-4, rtol=0)
    for name in ADAPTERS:
        adapter = load_peft_adapter(demo / "adapters" / name)
        assert adapter.rank == 8 and len(adapter.target_modules) == 7
    peft_model = PeftModel.from_pretrained(hf, str(demo / "adapters" / "math")).eval()
    with torch.no_grad():
        assert (peft_model(ids).logits - base_logits).abs().max() > 1e-2  # PEFT reads our adapter files
    gate = GateRouter.load(demo / "routers" / ROUTER)
    assert gate.adapters == list(ADAPTERS) and gate.top_k == 2


def test_demo_adapters_were_trained_on_their_domain(demo):
    """Each adapter lowers the loss on its own domain's text more than the others do."""
    from molora_core.demo.corpus import domain_texts
    from molora_core.engine import Engine, EngineConfig

    engine = Engine(demo / "model", EngineConfig(max_batch=1, hot_slots=4, max_rank=8))
    tokenizer, model = engine.tokenizer, engine.model
    from molora_core.routing import AdapterSpec, RoutingPlan

    losses = {}
    for name in ADAPTERS:
        engine.load_adapter(name, load_peft_adapter(demo / "adapters" / name))
    for domain in ADAPTERS:
        ids = torch.tensor([sum((tokenizer(t)["input_ids"] for t in domain_texts(domain, 6, seed=123)), [])[:120]])
        for name in ADAPTERS:
            plan = RoutingPlan(ids.numel(), 1, 4)
            plan.begin(ids.numel(), 1)
            plan.assign(0, AdapterSpec(name).bind(engine.hotset.resident()), ids[0])
            engine.context.meta = plan.finalize()
            with torch.no_grad():
                logits = model.forward_dense(ids)
            engine.context.meta = None
            losses[domain, name] = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    for domain in ADAPTERS:
        best = min(ADAPTERS, key=lambda name: losses[domain, name])
        assert best == domain, {name: round(losses[domain, name], 3) for name in ADAPTERS}


def test_demo_assets_replace_only_what_they_wrote(tmp_path, capsys):
    """A directory's own files stay: a model/ or adapters/<demo name>/ no manifest lists is
    refused, untouched; a rebuild replaces the paths the manifest lists, nothing else; assets
    missing a listed file count as absent, so they are made again."""
    root = tmp_path / "project"
    mine = root / "adapters" / "my-finetune" / "adapter_model.safetensors"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"three days of training")
    (root / "notes.txt").write_text("mine")
    (root / "adapters" / "math").mkdir()
    (root / "adapters" / "math" / "keep").write_text("not the demo's")
    assert main(["demo-assets", str(root)]) == 2
    assert "['adapters/math']" in capsys.readouterr().err
    assert (root / "adapters" / "math" / "keep").exists() and not (root / "model").exists()
    shutil.rmtree(root / "adapters" / "math")

    for _ in range(2):  # made, then made again over the first
        make_demo_assets(root, model_steps=1, adapter_steps=1, router_steps=1)
        listed = json.loads((root / "manifest.json").read_text())["sha256"]
        assert mine.read_bytes() == b"three days of training" and (root / "notes.txt").read_text() == "mine"
        assert not [k for k in listed if "my-finetune" in k or "notes" in k]
        assert set(listed) == {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {
            "manifest.json", "notes.txt", str(mine.relative_to(root))}
        assert demo_assets_present(root) and not list(root.glob(".demo-build-*"))
    (root / "routers" / ROUTER / "router.json").unlink()
    assert not demo_assets_present(root)


def test_demo_assets_in_a_path_that_cannot_be_a_directory_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert main(["demo-assets", str(target)]) == 2
        assert f"cannot write demo assets to {target}" in capsys.readouterr().err
