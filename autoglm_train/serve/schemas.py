"""Request bodies of the OpenAI-compatible API (pydantic): field types, ranges, and our extensions.

Unknown fields are ignored (clients send many optional ones); fields that would change the
answer in ways this server cannot honour (tools, JSON response formats, suffix) are refused
by the handlers with a 400 rather than silently dropped.

Extensions beyond OpenAI's fields: ``enable_thinking``, ``return_reasoning``,
``chat_template_kwargs`` (chat), ``ignore_eos`` (both), as vLLM and SGLang accept them; ``prompt_logprobs`` and
``return_tokens_as_token_ids`` (completions), as vLLM names them, so a teacher server's client
(:mod:`autoglm_train.distill.teacher_client`) reads our answers and vLLM's alike.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

KNOWN_PART_TYPES = ("text", "image_url", "input_audio")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str
    detail: str | None = None


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Model):
    data: str
    """Base64 audio bytes (a ``data:`` URL is accepted too)."""
    format: str = "wav"


class AudioPart(_Model):
    type: Literal["input_audio"]
    input_audio: InputAudio


class OtherPart(BaseModel):
    """A content part of a type this server does not know; refused with a 400 naming the type."""

    model_config = ConfigDict(extra="allow")
    type: str


def _part_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in KNOWN_PART_TYPES else "other"


ContentPart = Annotated[
    Annotated[TextPart, Tag("text")]
    | Annotated[ImagePart, Tag("image_url")]
    | Annotated[AudioPart, Tag("input_audio")]
    | Annotated[OtherPart, Tag("other")],
    Discriminator(_part_tag),
]


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Model):
    include_usage: bool = False


_Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
_TopP = Annotated[float, Field(gt=0.0, le=1.0)]
_Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
_Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]  # what torch.Generator.manual_seed takes (a 64-bit value)
Stop = str | Annotated[list[str], Field(max_length=16)] | None


def _invalid_unicode_at(value: Any, path: str = "") -> str | None:
    """Where the first string (or key) that is not valid Unicode sits, e.g. ``messages[0].content``; else None.

    JSON may escape a lone UTF-16 surrogate (``"\\ud800"``): Python decodes it into a ``str`` that no tokenizer or
    UTF-8 encoder accepts, so it is refused here, before it can reach either.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if _invalid_unicode_at(key) is not None:
                return f"{path or 'body'} (a key)"
            found = _invalid_unicode_at(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _invalid_unicode_at(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


class _Sampling(_Model):
    model: str
    temperature: _Temperature | None = None
    top_p: _TopP | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: _Seed | None = None
    presence_penalty: _Penalty = 0.0
    frequency_penalty: _Penalty = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _invalid_unicode_at(data)
        if where is not None:  # the message never repeats the bad text: it could not be encoded into the reply
            raise ValueError(f"{where} is not valid Unicode (a lone surrogate escape such as \\ud800)")
        return data


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    enable_thinking: bool | None = None
    """Thinking on/off, passed to the chat template (also accepted inside ``chat_template_kwargs``)."""
    return_reasoning: bool | None = None
    """Return the text between think tags as ``reasoning_content``; stripped when false (the default)."""
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    )
    max_tokens: Annotated[int, Field(ge=0)] = 16
    logprobs: Annotated[int, Field(ge=0)] | None = None
    """Top alternatives per token; at most the server's ``--max-logprobs`` (a 400 above it, worded as vLLM's)."""
    echo: bool = False
    prompt_logprobs: Annotated[int, Field(ge=0)] | None = None
    """vLLM's field: the top alternatives at every prompt position, in ``choices[i].prompt_logprobs``."""
    return_tokens_as_token_ids: bool = False
    """vLLM's field: tokens in ``logprobs`` are named ``token_id:N``, so no two alternatives share a key."""
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
