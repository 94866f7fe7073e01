"""The request bodies the server accepts: OpenAI's shapes (the fields this server honours) plus the
`bayes_llm` extension object. Unknown fields are refused by name, not silently ignored, so a client
asking for something this server does not do (`n` > 1, `logprobs`, `tools`, ...) learns it at once; the
value that asks for nothing (`n: 1`, `logprobs: false`, a 0 penalty) is accepted, and a null is the
default, as in OpenAI's API.

With the official client the extension goes through `extra_body={"bayes_llm": {...}}`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from bayes_llm.svf.blend import BlendMode

Text = Annotated[str, Field(min_length=1)]  # (pydantic refuses a lone surrogate in a constrained str)
Weight = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: object) -> object:
        # OpenAI's API reads a null as "not given": `"temperature": null` samples at the default. A
        # required field's null still gets its 400.
        if isinstance(data, dict):
            fields = cls.model_fields
            return {key: value for key, value in data.items()
                    if value is not None or key not in fields or fields[key].is_required()}  # fmt: skip
        return data


class Extension(Strict):
    """Per-request control of the adaptation; any of them overrides the server's dispatch params."""

    strategy: Text | None = Field(None, description="first pass: prompt | cls | base | expert:<domain>")
    blending_mode: BlendMode | None = None
    top_k: StrictInt | None = Field(None, ge=1)
    expert: Text | None = Field(None, description="answer with this expert alone (skips pass 1)")
    blend: dict[str, Weight] | None = Field(None, description="a fixed blend (skips pass 1)")
    ignore_eos: bool = Field(False, description="generate max_tokens tokens even past the end of the answer")

    @model_validator(mode="after")
    def _one_way(self) -> Extension:
        given = [name for name in ("strategy", "expert", "blend") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of strategy, expert, blend (got {', '.join(given)})")
        return self


class StreamOptions(Strict):
    include_usage: bool = False


class Sampled(Strict):
    model: Text
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 (the default here): greedy")
    top_p: float = Field(1.0, ge=0.0, le=1.0, description="0: the top token only")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[Text] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1)
    user: str | None = None
    # What this server does not do, accepted at the value that asks for nothing (clients send defaults)
    n: Literal[1] | None = Field(None, description="one choice per request")
    logprobs: Literal[False] | None = None
    presence_penalty: Annotated[float, Field(ge=0, le=0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] | None = None
    bayes_llm: Extension = Field(default_factory=Extension)

    @model_validator(mode="after")
    def _stream_options(self) -> Sampled:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only with stream: true")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty strings")
        return stops


class CompletionRequest(Sampled):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=64)]


class TextPart(Strict):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _unicode(cls, value: str) -> str:
        return _encodable(value)


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _unicode(cls, value: str | list[TextPart]) -> str | list[TextPart]:
        return _encodable(value) if isinstance(value, str) else value

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(Sampled):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


def _encodable(value: str) -> str:
    try:  # a lone surrogate (half an emoji, cut by a client) is valid JSON but no text a tokenizer takes
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"not valid Unicode text ({error.reason} at character {error.start})") from None
    return value
