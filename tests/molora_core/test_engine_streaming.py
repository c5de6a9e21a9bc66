"""Streaming text deltas: multi-byte UTF-8 characters split across tokens, and stop strings that
straddle tokens, never leak a replacement character or a cut-off stop string into the stream."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from molora_core.demo import ensure_demo_assets
from molora_core.engine import Engine, EngineConfig, Request, SamplingParams
from molora_core.engine.detokenize import IncrementalDetokenizer

TEXT = "é日🙂Ж语"  # 14 UTF-8 bytes, all distinct


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    return ensure_demo_assets(tmp_path_factory.getbasetemp() / "demo-assets")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def byte_token_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte, through the byte-level alphabet (GPT-2's bytes_to_unicode)."""
    alphabet = bytes_to_unicode()
    ids = tokenizer.convert_tokens_to_ids([alphabet[b] for b in text.encode()])
    assert tokenizer.unk_token_id not in ids and None not in ids
    return ids


@pytest.fixture(scope="module")
def chain_model(demo, tmp_path_factory):
    """A Qwen3 checkpoint whose greedy continuation of "A" is TEXT byte by byte, then EOS."""
    tokenizer = AutoTokenizer.from_pretrained(demo / "model")
    chain = [tokenizer.convert_tokens_to_ids("A"), *byte_token_ids(tokenizer, TEXT), tokenizer.eos_token_id]
    assert len(set(chain)) == len(chain)
    path = tmp_path_factory.mktemp("chain")
    save_chain_model(tokenizer, chain, path)
    return path, chain


def save_chain_model(tokenizer, chain: list[int], path) -> None:
    """Save under path a Qwen3 checkpoint (and the tokenizer) whose greedy continuation of
    chain[i] is chain[i + 1]: attention and MLP outputs are zeroed, so the last hidden state is
    the (normed) embedding of the current token, and lm_head row chain[i + 1] points along
    chain[i]'s embedding."""
    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False,
                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        model.lm_head.weight.zero_()
        for a, b in zip(chain, chain[1:]):
            model.lm_head.weight[b] = 20 * emb[a] / emb[a].norm()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_multibyte_characters_stream_whole(chain_model):
    path, chain = chain_model
    engine = Engine(path, EngineConfig(max_batch=2, max_seq_len=32, hot_slots=1, max_rank=4))
    handle = engine.submit(Request([chain[0]], SamplingParams(max_tokens=30)))
    deltas = list(handle)
    out = handle.output()
    assert list(out.token_ids) == chain[1:]  # greedy walks the chain and ends on EOS
    assert out.finish_reason == "stop" and out.completion_tokens == len(chain) - 1
    assert out.text == TEXT
    assert "".join(d.text for d in deltas) == TEXT
    assert all("\ufffd" not in d.text for d in deltas)
    # Characters are released whole: the deltas are exactly the characters, and tokens that end
    # inside a character send no text.
    assert [d.text for d in deltas if d.text] == list(TEXT)
    assert sum(1 for d in deltas if not d.text) == len(TEXT.encode()) - len(TEXT) + 1  # +1: the EOS delta


def test_detokenizer_holds_back_partial_stop_strings(demo):
    tokenizer = AutoTokenizer.from_pretrained(demo / "model")
    ids = byte_token_ids(tokenizer, "ab日cd")
    detok = IncrementalDetokenizer(tokenizer, stop=("日c",))
    sent = []
    for token in ids:
        detok.add(token)
        sent.append(detok.take_delta(final=detok.stopped))
        if detok.stopped:
            break
    assert detok.stopped and "".join(sent) == "ab" == detok.text


def test_detokenizer_flushes_a_broken_tail(demo):
    tokenizer = AutoTokenizer.from_pretrained(demo / "model")
    ids = byte_token_ids(tokenizer, "x日")[:-1]  # ends inside the character
    detok = IncrementalDetokenizer(tokenizer)
    for token in ids:
        detok.add(token)
    assert detok.take_delta(final=False) == "x"
    detok.flush()
    assert detok.take_delta(final=True) == tokenizer.decode(ids)[1:]


def test_detokenizer_skips_stop_strings_while_told_to(demo):
    """min_tokens' side: text added (or flushed) with check_stop=False counts as checked; a stop
    string is found later only where it ends in newer text, each string in its own window."""
    tokenizer = AutoTokenizer.from_pretrained(demo / "model")
    ids = byte_token_ids(tokenizer, "ab,cd?e")
    detok = IncrementalDetokenizer(tokenizer, stop=(",", "?", "a-long-stop"))
    for token in ids[:3]:  # "ab,"
        detok.add(token, check_stop=False)
    assert not detok.stopped
    for token in ids[3:]:
        detok.add(token)
        if detok.stopped:
            break
    assert detok.stopped and detok.text == "ab,cd"
    broken = byte_token_ids(tokenizer, "x日")[:-1]  # the flush releases a U+FFFD
    for check_stop in (False, True):
        detok = IncrementalDetokenizer(tokenizer, stop=("\ufffd",))
        for token in broken:
            detok.add(token, check_stop=False)
        detok.flush(check_stop=check_stop)
        assert detok.stopped == check_stop and detok.text == ("x" if check_stop else tokenizer.decode(broken))


def test_a_sentencepiece_tokenizers_first_generated_word_keeps_its_space(tmp_path):
    """A Metaspace (SentencePiece) decoder drops the leading space of the first token it decodes,
    so the first generated word decoded alone lost its space ("w99" + "w127", not " w127"). The
    decode window starts on the prompt's last tokens: the completion is decode(prompt +
    completion) past decode(prompt), streamed and whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"\u2581w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(tmp_path)
    engine = Engine(tmp_path, EngineConfig(max_batch=1, max_seq_len=64))
    handle = engine.submit(Request("w5 w17 w99", SamplingParams(max_tokens=4, ignore_eos=True)))
    streamed = "".join(d.text for d in handle)
    out = handle.output()
    prompt_ids = fast("w5 w17 w99")["input_ids"]
    want = fast.decode(prompt_ids + list(out.token_ids), skip_special_tokens=True)[len(fast.decode(
        prompt_ids, skip_special_tokens=True)):]
    assert want.startswith(" w") and out.text == want == streamed


def _byte_fallback_tokenizer():
    """Llama-2 / Mistral style: Metaspace, byte-fallback tokens <0x00>..<0xFF>, a few words."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    merges = []
    for word in ("\u2581hello", "\u2581world", "\u2581the", "\u2581hi"):
        for ch in word:
            vocab.setdefault(ch, len(vocab))
        for i in range(2, len(word) + 1):
            merges.append((word[: i - 1], word[i - 1]))
            vocab.setdefault(word[:i], len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="\u2581",
                                                                                   prepend_scheme="always")])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _streamed(tokenizer, prompt, generated, **kw):
    """The detokenizer's deltas for `generated` after `prompt`, the last one final."""
    detok = IncrementalDetokenizer(tokenizer, prompt=prompt, **kw)
    deltas = []
    for token in generated:
        detok.add(token)
        deltas.append(detok.take_delta(final=False))
    detok.flush()
    return deltas + [detok.take_delta(final=True)]


@pytest.mark.parametrize("case", ["prompt ends in a whole emoji", "prompt ends in special tokens",
                                  "prompt ends inside a character"])
def test_the_decode_window_starts_on_whole_characters_that_decode_to_text(case):
    """Byte-fallback tokenizers turn a run of byte tokens into U+FFFD when one is a stray
    continuation byte, so a window starting inside the prompt's last character lost the first
    generated character; special tokens in the window decode to nothing, so the first word lost
    its space; and a prompt ending inside a character lost the text that completed it. The
    completion is decode(prompt + completion) past the prompt's text, streamed and whole."""
    fast = _byte_fallback_tokenizer()
    byte_ids = lambda text: [fast.convert_tokens_to_ids(f"<0x{b:02X}>") for b in text.encode()]  # noqa: E731
    word = fast.convert_tokens_to_ids
    if case == "prompt ends in a whole emoji":  # its last 5 tokens begin on a continuation byte
        prompt = fast("hi")["input_ids"] + byte_ids("🙂🙂")
        generated, want = byte_ids("日") + [word("\u2581hello")], "日 hello"
    elif case == "prompt ends in special tokens":
        prompt, generated, want = [1, word("\u2581hello"), 2, 1, 2, 1, 1], [word("\u2581world")], " world"
    else:
        prompt = fast("hello")["input_ids"] + byte_ids("日")[:2]
        generated, want = byte_ids("日")[2:] + [word("\u2581the"), word("\u2581world")], "日 the world"
    full = fast.decode(prompt + generated, skip_special_tokens=True)
    assert full.endswith(want) and "\ufffd" not in want  # (the oracle: transformers' decode of it all)
    deltas = _streamed(fast, prompt, generated)
    assert "".join(deltas) == want and not any("\ufffd" in d for d in deltas)


def _byte_level_tokenizer():
    """GPT-2 / Qwen style byte-level BPE whose " 日本" merges give a token " 日" + 0xE6 (the
    first byte of 本), which ends inside a character."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = bytes_to_unicode()
    vocab, merges = {alphabet[b]: b for b in range(256)}, []
    for word in (" the", " 日本", "cat"):
        chars = "".join(alphabet[b] for b in word.encode())
        for i in range(2, len(chars) + 1):
            merges.append((chars[: i - 1], chars[i - 1]))
            vocab.setdefault(chars[:i], len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    held = fast.convert_tokens_to_ids("".join(alphabet[b] for b in " 日".encode() + "本".encode()[:1]))
    return fast, [fast.convert_tokens_to_ids("Ġthe"), held, fast.convert_tokens_to_ids("cat")]


def test_held_back_whole_characters_before_min_tokens_end_nothing():
    """A token ending inside a character is held back with the whole characters before it; if
    it came before min_tokens (check_stop False), a stop string among those characters must not
    end the output once the next token releases them."""
    fast, (the, held, cat) = _byte_level_tokenizer()
    detok = IncrementalDetokenizer(fast, stop=("日",), prompt=fast("hello")["input_ids"])
    detok.add(the, check_stop=False)
    detok.add(held, check_stop=False)  # " 日" + a lead byte: held back
    detok.add(cat)  # the 3rd token, min_tokens=3: checks from here on
    assert not detok.stopped and detok.text.startswith(" the 日")


def test_a_stop_string_in_the_held_back_tail_finishes_with_stop(tmp_path):
    """max_tokens ends the request on a token whose text was held back (it ends inside a
    character); the final flush finds a stop string in it and cuts the text there, so the
    request finishes with "stop", not "length"."""
    fast, (the, held, _) = _byte_level_tokenizer()
    prompt = fast("cat")["input_ids"]
    save_chain_model(fast, [prompt[-1], the, held, fast.eos_token_id], tmp_path)
    engine = Engine(tmp_path, EngineConfig(max_batch=1, max_seq_len=32, hot_slots=1, max_rank=4))
    handle = engine.submit(Request(prompt, SamplingParams(max_tokens=2, stop=("日",))))
    streamed = "".join(d.text for d in handle)
    out = handle.output()
    assert list(out.token_ids) == [the, held]
    assert (out.text, streamed, out.finish_reason) == (" the ", " the ", "stop")
    engine.close()
