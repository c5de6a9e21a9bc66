"""Demo assets made locally, with no download: a tiny Qwen3 model, a byte-level BPE tokenizer,
four LoRA adapters in PEFT format and a gate router over them.

Everything is trained briefly on the built-in corpus (`corpus.py`) with fixed seeds on one CPU
thread, so the same torch / tokenizers / transformers versions give the same bytes every time:
- tokenizer: byte-level BPE (1024 ids) trained with `tokenizers`;
- model: Qwen3 architecture (4 layers, hidden 128, ~0.9M parameters) trained for `model_steps`
  steps on all four domains (seconds on one CPU thread) -- enough to produce
  corpus-like text, nothing more;
- adapters `code`, `math`, `chat`, `multilingual`: rank-8 LoRA on every projection, each trained
  on its own domain with the base frozen, saved with `save_peft_adapter`;
- router `demo-gate`: a top-2 MoLoRA gate over the four adapters, trained with `train_gate`.

Layout: DIR/model/, DIR/adapters/<name>/, DIR/routers/demo-gate/, DIR/manifest.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch

from molora_core.adapter import LoRAAdapter, LoRAModule
from molora_core.demo.corpus import DOMAINS, corpus
from molora_core.errors import MoLoRAError
from molora_core.lora_layer import TARGET_MODULES
from molora_core.peft_io import save_peft_adapter
from molora_core.routing import GateRouter

ADAPTERS = DOMAINS
ROUTER = "demo-gate"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024
SEQ_LEN = 64
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@contextlib.contextmanager
def _one_thread():
    """CPU matmul results can depend on the thread count; one thread keeps the bytes stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer (transformers PreTrainedTokenizerFast) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )


def _batches(tokenizer, texts, seed: int, steps: int, batch: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    stream = torch.tensor([t for text in texts for t in tokenizer(text)["input_ids"] + [eos]], dtype=torch.long)
    out = []
    for _ in range(steps):
        starts = torch.randint(0, stream.numel() - SEQ_LEN, (batch,), generator=gen).tolist()
        out.append(torch.stack([stream[s : s + SEQ_LEN] for s in starts]))
    return out


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def build_model(tokenizer, steps: int, texts: list[str]):
    """A Qwen3ForCausalLM trained for `steps` steps on `texts`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    for ids in _batches(tokenizer, texts, seed=1, steps=steps, batch=8):
        loss = _loss(model(ids).logits, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def train_adapter(model, tokenizer, name: str, texts: list[str], steps: int, seed: int, rank: int = 8) -> LoRAAdapter:
    """A LoRA adapter (every projection, rank `rank`, alpha 2*rank) fitted to `texts`, base frozen."""
    from torch.func import functional_call

    scale = 2.0
    gen = torch.Generator().manual_seed(seed)
    targets = {
        n: m for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGET_MODULES
    }
    params = {}
    for n, m in targets.items():
        a = (torch.randn(rank, m.in_features, generator=gen) / m.in_features**0.5).requires_grad_()
        b = torch.zeros(m.out_features, rank).requires_grad_()
        params[n] = (a, b)
    opt = torch.optim.AdamW([t for pair in params.values() for t in pair], lr=5e-3, weight_decay=0.0)
    for ids in _batches(tokenizer, texts, seed=seed, steps=steps, batch=8):
        weights = {f"{n}.weight": targets[n].weight.detach() + scale * b @ a for n, (a, b) in params.items()}
        loss = _loss(functional_call(model, weights, (ids,)).logits, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    modules = {n: LoRAModule(a.detach().clone(), b.detach().clone(), scale) for n, (a, b) in params.items()}
    return LoRAAdapter(name, modules)


def train_router(model, tokenizer, adapters: dict[str, LoRAAdapter], texts: dict[str, list[str]], steps: int) -> GateRouter:
    """A top-2 gate over the adapters, trained on a mix of every domain with the adapters frozen."""
    import copy

    from kernels import get_backend
    from molora_core.hotset import HotSet
    from molora_core.lora_layer import LoRAContext, attach_molora
    from molora_core.training import train_gate

    routed = copy.deepcopy(model)
    hotset = HotSet.for_model(routed, TARGET_MODULES, len(adapters), max(a.rank for a in adapters.values()))
    context = LoRAContext(get_backend("torch"))
    attach_molora(routed, hotset, context)
    slot_of = {name: hotset.acquire(name, lambda a=a: a) for name, a in adapters.items()}
    torch.manual_seed(2)
    gate = GateRouter(model.config.hidden_size, list(adapters), top_k=2)
    mixed = [t for domain in DOMAINS for t in texts[domain]]
    batches = _batches(tokenizer, mixed, seed=3, steps=min(steps, 8), batch=8)
    train_gate(routed, gate, slot_of, context, hotset.num_slots, batches, steps=steps, lr=2e-2)
    return gate


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _claimed(root: Path) -> set[str]:
    """The paths (relative to `root`) an earlier `make_demo_assets` wrote there, from its
    manifest; empty when there is none."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        return {manifest["model"], *manifest["adapters"].values(), *manifest["routers"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def make_demo_assets(
    directory: str | Path, model_steps: int = 200, adapter_steps: int = 30, router_steps: int = 20,
) -> Path:
    """Write the demo model, tokenizer, adapters and router under `directory`; returns it.

    Replaces what an earlier call wrote there (the paths its manifest lists), and nothing else:
    other files and adapters under `directory` stay, and a `model/`, `adapters/<name>/` or
    `routers/demo-gate/` that no manifest lists is refused (MoLoRAError). The assets are built
    in a scratch directory beside them and moved into place at the end."""
    root = Path(directory).expanduser()
    targets = ["model", *(f"adapters/{name}" for name in ADAPTERS), f"routers/{ROUTER}"]
    claimed = _claimed(root) & set(targets)
    foreign = [t for t in targets if t not in claimed and (root / t).exists()]
    if foreign:
        raise MoLoRAError(f"{root} already holds {foreign}, which no demo assets manifest there lists; "
                          "make the demo assets in another directory, or move those away")
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".demo-build-*"):  # an earlier call's, interrupted
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=root))
    try:
        _build(scratch, model_steps, adapter_steps, router_steps)
        files = sorted(p for t in targets for p in (scratch / t).rglob("*") if p.is_file())
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": "model",
            "adapters": {name: f"adapters/{name}" for name in ADAPTERS},
            "routers": {ROUTER: f"routers/{ROUTER}"},
            "training": {"model_steps": model_steps, "adapter_steps": adapter_steps, "router_steps": router_steps},
            "note": "tiny model trained for seconds on a templated corpus: it imitates the corpus, it is not useful",
            "sha256": {str(p.relative_to(scratch)): _sha256(p) for p in files},
        }
        (root / MANIFEST).unlink(missing_ok=True)  # (incomplete until every path is in place)
        for rel in sorted(claimed):
            old = root / rel
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif old.exists() or old.is_symlink():
                old.unlink()
        for rel in targets:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (scratch / rel).rename(root / rel)
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (scratch / MANIFEST).rename(root / MANIFEST)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return root


def _build(root: Path, model_steps: int, adapter_steps: int, router_steps: int) -> None:
    texts = corpus()
    all_texts = [t for d in DOMAINS for t in texts[d]]
    with _one_thread():
        tokenizer = train_tokenizer(all_texts)
        model = build_model(tokenizer, model_steps, all_texts)
        for p in model.parameters():
            p.requires_grad_(False)
        adapters = {
            name: train_adapter(model, tokenizer, name, texts[name], adapter_steps, seed=10 + i)
            for i, name in enumerate(ADAPTERS)
        }
        gate = train_router(model, tokenizer, adapters, texts, router_steps)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for name, adapter in adapters.items():
        save_peft_adapter(adapter, root / "adapters" / name, lora_alpha=2.0 * adapter.rank, base_model="molora-demo")
    gate.save(root / "routers" / ROUTER)


def demo_assets_present(directory: str | Path) -> bool:
    """Whether `directory` holds complete demo assets: a manifest, and every file it lists."""
    root = Path(directory)
    try:
        listed = json.loads((root / MANIFEST).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(listed, dict) and bool(listed) and all((root / rel).is_file() for rel in listed)


def ensure_demo_assets(directory: str | Path) -> Path:
    """The demo assets under `directory`, made first if they are not there yet."""
    if not demo_assets_present(directory):
        make_demo_assets(directory)
    return Path(directory)
