"""The request bodies the server accepts: OpenAI's shapes (the fields this server honours) plus the
`bayes_llm` extension object. Unknown fields are refused by name, not silently ignored, so a client
asking for something this server does not do (`n`, `logprobs`, `tools`, ...) learns it at once.

With the official client the extension goes through `extra_body={"bayes_llm": {...}}`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bayes_llm.svf.blend import BlendMode

Text = Annotated[str, Field(min_length=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Extension(Strict):
    """Per-request control of the adaptation; any of them overrides the server's dispatch params."""

    strategy: str | None = Field(None, description="first pass: prompt | cls | base | expert:<domain>")
    blending_mode: BlendMode | None = None
    top_k: int | None = Field(None, ge=1)
    expert: str | None = Field(None, description="answer with this expert alone (skips pass 1)")
    blend: dict[str, Annotated[float, Field(ge=0)]] | None = Field(None, description="a fixed blend (skips pass 1)")
    ignore_eos: bool = Field(False, description="generate max_tokens tokens even past the end of the answer")


class StreamOptions(Strict):
    include_usage: bool = False


class Sampled(Strict):
    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 (the default here): greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[Text] | None = None
    seed: int | None = None
    user: str | None = None
    bayes_llm: Extension = Field(default_factory=Extension)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: up to 4 non-empty strings")
        return stops


class CompletionRequest(Sampled):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=64)]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(Sampled):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
