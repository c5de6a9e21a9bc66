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
    """A Qwen3 checkpoint whose greedy continuation of "A" is TEXT byte by byte, then EOS.

    Attention and MLP outputs are zeroed, so the last hidden state is the (normed) embedding of
    the current token, and lm_head row next(a) points along token a's embedding.
    """
    tokenizer = AutoTokenizer.from_pretrained(demo / "model")
    chain = [tokenizer.convert_tokens_to_ids("A"), *byte_token_ids(tokenizer, TEXT), tokenizer.eos_token_id]
    assert len(set(chain)) == len(chain)
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
    path = tmp_path_factory.mktemp("chain")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, chain


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
