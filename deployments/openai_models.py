"""Request bodies of the OpenAI-compatible routes (the fields MoLoRA Serve reads).

Unknown fields are ignored, as OpenAI clients send fields a server may not use (`user`,
`metadata`, ...). Fields whose non-default values we cannot honour (best_of, suffix, tools,
response_format other than text, output modalities other than text) are refused with a 400
instead of being silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


# At most this many logit_bias entries per request.
MAX_LOGIT_BIAS = 1024
# At most this many choices (`n`) per request.
MAX_CHOICES = 16
# At most this many prompts in one completions request, and replica calls (prompts x n) per request.
MAX_PROMPTS = 64
MAX_CALLS = 64
# At most this many alternatives per generated token (as OpenAI's chat API; its completions API allows 5).
MAX_LOGPROBS = 20


def _refuse_unless(value: Any, allowed: bool, what: str) -> Any:
    if not allowed:
        raise ValueError(f"{what} is not supported")
    return value


class AdapterWeight(BaseModel):
    """One member of an explicit mixture (`adapters` extra body field)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=80, description="Registered adapter name, optionally 'name@version'.")
    weight: float = Field(1.0, gt=0, le=100, description="Mixing weight, the same for every token.")


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="Send a last chunk with the usage totals.")
    continuous_usage_stats: bool = Field(False, description="Each chunk carries its choice's usage so far; vLLM's.")


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200, description="Base model, adapter name, or 'molora:<router>'.")
    adapters: list[AdapterWeight] | None = Field(
        None, min_length=1, max_length=16,
        description="Explicit mixture; `model` must then be the base model. At most max_top_k members (the replicas')."
    )
    max_tokens: int | None = Field(None, ge=0, le=1 << 20, description="Tokens to generate (0: completions with echo).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=-1, le=1 << 20, description="Top-k filter (0 or -1 = off); not an OpenAI field.")
    seed: int | None = Field(None, ge=0, lt=1 << 63, description="Same seed, same output.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    stream: bool = Field(False, description="Server-sent events.")
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate (choice i samples with seed + i).")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Taken once off each generated token's logit.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Taken off per time a token was generated.")
    logit_bias: dict[str, float] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="Token id (a string) -> bias in [-100, 100], added to its logit."
    )
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks); not an OpenAI field.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="transformers' and vLLM's; not OpenAI's.")
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="Token ids that end the output too.")
    include_stop_str_in_output: bool = Field(
        False, description="End after the stop string (or stop token's text) instead of before it; vLLM's."
    )
    min_tokens: int = Field(
        0, ge=0, le=1 << 20, description="Tokens generated before EOS, stop tokens or strings can end it; vLLM's."
    )

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data):
        """A field sent as null takes its default, as OpenAI's API and vLLM read it (the `openai`
        client sends null for a parameter passed as None)."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value):
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias key {key!r}; expected a token id (a non-negative integer)")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias[{key!r}]={bias}; expected -100 <= bias <= 100")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError(f"stop={value!r}; expected at most 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _min_tokens(self) -> "_Common":
        requested = self.requested_max_tokens()
        if requested is not None and self.min_tokens > requested:
            raise ValueError(f"min_tokens={self.min_tokens} exceeds max_tokens={requested}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true (as OpenAI's API)")
        return self

    def requested_max_tokens(self) -> int | None:
        """max_tokens as the body sets it; None: unset."""
        return self.max_tokens

    def top_logprobs_wanted(self) -> int | None:
        """Alternatives per generated token with its log-probability; None: no log-probabilities."""
        return None

    def prompt_logprobs_wanted(self) -> int | None:
        """Alternatives per prompt token with its log-probability; None: the prompt is not scored."""
        return None

    def sampling_fields(self, default_max_tokens: int) -> dict:
        """The engine's SamplingParams fields. Unset, max_tokens is the default, or min_tokens
        where that is more, and the replica lets the context's end cut it short; set, a prompt
        plus max_tokens past the context is refused (400 context_length_exceeded), as OpenAI's."""
        max_tokens = max(default_max_tokens, self.min_tokens) if self.max_tokens is None else self.max_tokens
        return {
            "logprobs": self.top_logprobs_wanted(), "prompt_logprobs": self.prompt_logprobs_wanted(),
            "temperature": self.temperature, "top_p": self.top_p, "top_k": max(self.top_k, 0),
            "seed": self.seed, "max_tokens": max_tokens, "max_tokens_set": self.requested_max_tokens() is not None,
            "min_tokens": self.min_tokens,
            "stop": list(self.stop or []), "include_stop_str_in_output": self.include_stop_str_in_output,
            "ignore_eos": self.ignore_eos, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
            "stop_token_ids": list(self.stop_token_ids or []),
            "logit_bias": [[int(token), bias] for token, bias in (self.logit_bias or {}).items()],
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(_Common):
    """`POST /v1/completions`."""

    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description=f"A prompt (text, or token ids), or a batch of up to {MAX_PROMPTS} (texts, or token-id lists)."
    )
    echo: bool = Field(False, description="The prompt before the completion (and its tokens' logprobs).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Alternatives per token, with logprobs.")
    best_of: int | None = Field(None, description="Not supported (must be unset or 1).")
    suffix: str | None = Field(None, description="Not supported (must be unset or empty).")

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    def prompt_logprobs_wanted(self) -> int | None:
        if self.echo and self.max_tokens == 0:
            # The engine runs a request that generates nothing only to score its prompt: scored,
            # and the scores dropped where logprobs are not asked for (the prompt echoed alone).
            return self.logprobs or 0
        return self.logprobs if self.echo else None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value):
        return _refuse_unless(value, value in (None, 1), "best_of > 1")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value):
        return _refuse_unless(value, not value, "suffix (insertion)")

    @model_validator(mode="after")
    def _request_bounds(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 needs echo=true (it returns the prompt, scored with logprobs if asked)")
        if len(self.prompts()) * self.n > MAX_CALLS:
            raise ValueError(f"{len(self.prompts())} prompts x n={self.n} choices; at most {MAX_CALLS} per request")
        return self

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value):
        def ids(item) -> bool:
            return isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)

        if not (isinstance(value, str) or ids(value) or (isinstance(value, list) and (
                all(isinstance(item, str) for item in value) or all(ids(item) for item in value)))):
            raise ValueError("expected a string, a list of token ids, a list of strings or a list of token-id lists")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if not value:
            raise ValueError("prompt is empty")
        if isinstance(value, list) and isinstance(value[0], (str, list)):
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"{len(value)} prompts; at most {MAX_PROMPTS} per request")
            empty = [i for i, prompt in enumerate(value) if not prompt]
            if empty:
                raise ValueError(f"prompts {empty[:5]} are empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The batch: one prompt, text or token ids, per entry."""
        single = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if single else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise ValueError(f"content part of type {part.get('type')!r}; only 'text' is supported")
                parts.append(str(part.get("text", "")))
            return "".join(parts)
        return self.content or ""


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """The messages as the chat template takes them ("developer" is OpenAI's newer "system")."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class ChatCompletionRequest(_Common):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 20, description="Alias of max_tokens.")
    logprobs: bool = Field(False, description="Each generated token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Alternatives per token (with logprobs).")
    tools: list[Any] | None = Field(None, description="Not supported (must be unset or empty).")
    functions: list[Any] | None = Field(None, description="Not supported (must be unset or empty).")
    tool_choice: Any = Field(None, description="Not supported (must be unset or 'none').")
    function_call: Any = Field(None, description="Not supported (must be unset or 'none').")
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'}.")
    modalities: list[str] | None = Field(None, description="Only ['text'].")

    @field_validator("tools", "functions")
    @classmethod
    def _tools(cls, value):
        return _refuse_unless(value, not value, "tool calling")

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _tool_choice(cls, value):
        return _refuse_unless(value, value in (None, "none"), "tool calling")

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value):
        text = value is None or value.get("type") == "text"
        return _refuse_unless(value, text, "structured output (response_format)")

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value):
        return _refuse_unless(value, not value or set(value) == {"text"}, "output other than text")

    @model_validator(mode="after")
    def _alias(self) -> "ChatCompletionRequest":
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.max_tokens == 0:
            raise ValueError("max_tokens=0; expected at least 1 for a chat completion")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} needs logprobs=true")
        for m in self.messages:
            m.text()  # raises on non-text parts while the body is validated
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_tokens is None else self.max_tokens

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def message_dicts(self) -> list[dict]:
        return message_dicts(self.messages)


class TokenizeRequest(BaseModel):
    """`POST /tokenize` (vLLM's extension): a prompt, or chat messages, as generation tokenizes it."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200, description="A served model (any: they share one tokenizer).")
    prompt: str | None = Field(None, description="Text, tokenized as /v1/completions does.")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, max_length=1024, description="Chat messages, rendered as /v1/chat/completions does."
    )

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("expected exactly one of prompt and messages")
        for m in self.messages or []:
            m.text()
        return self

    def payload(self) -> dict:
        if self.messages is not None:
            return {"messages": message_dicts(self.messages)}
        return {"prompt": self.prompt}


class DetokenizeRequest(BaseModel):
    """`POST /detokenize` (vLLM's extension)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200, description="A served model.")
    tokens: list[int] = Field(max_length=1 << 20, description="Token ids to decode.")

    def payload(self) -> dict:
        return {"tokens": self.tokens}
