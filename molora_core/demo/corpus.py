"""A small built-in training corpus for the demo assets, generated from templates with a fixed
seed: four domains (code, math, chat, multilingual text with non-ASCII characters), so the demo
adapters have something distinct to specialise in and the tokenizer learns multi-byte merges."""

from __future__ import annotations

import random

DOMAINS = ("code", "math", "chat", "multilingual")

_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"]
_OPS = [("+", lambda a, b: a + b, "plus"), ("-", lambda a, b: a - b, "minus"), ("*", lambda a, b: a * b, "times")]
_CHAT = [
    ("Hello! How are you today?", "I am doing well, thank you for asking. How can I help you?"),
    ("Can you recommend a good book?", "Sure! A classic novel is always a good choice for a quiet evening."),
    ("What is the weather like?", "I cannot see outside, but I hope it is sunny where you are."),
    ("Tell me a short joke.", "Why did the computer go to sleep? It needed to recharge its memory."),
    ("Thanks for your help!", "You are welcome. Have a wonderful day!"),
    ("What should I cook tonight?", "A simple pasta with tomatoes, garlic and basil is quick and tasty."),
]
_MULTI = [
    "Bonjour, ça va ? Très bien, merci. Le café est délicieux.",
    "Grüße aus München! Die Straße ist schön und ruhig.",
    "¿Dónde está la estación? Está cerca del río, señor.",
    "Привет, мир! Как дела? Всё хорошо, спасибо.",
    "日本語のテキストです。今日はいい天気ですね。",
    "中文文本：你好，世界！我们今天学习语言。",
    "Γειά σου κόσμε! Η θάλασσα είναι μπλε.",
    "안녕하세요! 오늘 날씨가 좋네요.",
    "Emoji time: 🙂 🚀 🎉 ✨ — naïve café, résumé, coöperate.",
]


def _code(rng: random.Random) -> str:
    name, k = rng.choice(_NAMES), rng.randint(2, 9)
    templates = [
        f"def add_{k}(x):\n    return x + {k}\n",
        f"def greet_{name}():\n    print(\"hello, {name}\")\n",
        f"for i in range({k}):\n    total += i * {k}\n",
        f"class {name.title()}Counter:\n    def __init__(self):\n        self.count = {k}\n",
        f"if value > {k}:\n    result = value - {k}\nelse:\n    result = {k}\n",
        f"items = [x * {k} for x in range(10) if x % 2 == 0]\n",
    ]
    return rng.choice(templates)


def _math(rng: random.Random) -> str:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    sym, fn, word = rng.choice(_OPS)
    templates = [
        f"Q: What is {a} {sym} {b}? A: {a} {sym} {b} = {fn(a, b)}.\n",
        f"Compute {a} {word} {b}. The answer is {fn(a, b)}.\n",
        f"Let x = {a}. Then x {sym} {b} = {fn(a, b)}, so the result is {fn(a, b)}.\n",
    ]
    return rng.choice(templates)


def _chat(rng: random.Random) -> str:
    user, assistant = rng.choice(_CHAT)
    return f"User: {user}\nAssistant: {assistant}\n"


def _multilingual(rng: random.Random) -> str:
    return rng.choice(_MULTI) + "\n"


_MAKERS = {"code": _code, "math": _math, "chat": _chat, "multilingual": _multilingual}


def domain_texts(domain: str, n: int, seed: int = 0) -> list[str]:
    """n deterministic snippets of one domain."""
    rng = random.Random(f"{domain}:{seed}")
    return [_MAKERS[domain](rng) for _ in range(n)]


def corpus(n_per_domain: int = 300, seed: int = 0) -> dict[str, list[str]]:
    return {d: domain_texts(d, n_per_domain, seed) for d in DOMAINS}
