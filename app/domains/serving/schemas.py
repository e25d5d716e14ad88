"""OpenAI's completion and chat completion shapes (requests, responses, stream chunks), and their
translation to and from the inference protocol (app/domains/serving/protocol.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.domains.files import formats
from app.domains.serving import protocol

# OpenAI's chat default is "up to the context"; a bound keeps an omitted max_tokens from running long.
CHAT_MAX_TOKENS = 256

FinishReason = Literal["stop", "length"]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingOptions(BaseModel):
    """What completions and chat completions share: the model and how to sample from it."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=255, description="A fine-tuned model of the team, or a base model.")
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a chunk carrying the usage."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def _generate(self, *, team_id: str, adapter_id: str | None, **prompt) -> protocol.GenerateRequest:
        return protocol.GenerateRequest(team_id=team_id, adapter_id=adapter_id, stream=bool(self.stream),
                                        temperature=self.temperature, top_p=self.top_p, n=self.n, stop=self.stop,
                                        seed=self.seed, **prompt)


class CompletionCreate(SamplingOptions):
    prompt: str | list[int] = Field(description="Text, or token ids of the base model's tokenizer.")
    max_tokens: Annotated[int, Field(ge=1)] | None = 16

    def generate_request(self, *, team_id: str, adapter_id: str | None) -> protocol.GenerateRequest:
        """The request the inference process gets for this one."""
        return self._generate(team_id=team_id, adapter_id=adapter_id, prompt=self.prompt, max_tokens=self.max_tokens)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    # Given to the chat template as the message's name, as training gives it (formats.template_messages).
    name: Annotated[str, Field(min_length=1)] | None = None

    def text(self) -> str:
        """The content as the chat template gets it: content parts joined as training joins them."""
        return formats.content_text(self.model_dump()["content"]) or ""


class ChatCompletionCreate(SamplingOptions):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def generate_request(self, *, team_id: str, adapter_id: str | None) -> protocol.GenerateRequest:
        """The request the inference process gets for this one: the messages' text (content parts
        joined), rendered there with the fine-tuned model's chat template."""
        messages = [protocol.ChatTurn(role=m.role, content=m.text(), name=m.name) for m in self.messages]
        max_tokens = self.max_completion_tokens or self.max_tokens or CHAT_MAX_TOKENS
        return self._generate(team_id=team_id, adapter_id=adapter_id, messages=messages, max_tokens=max_tokens)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, result: protocol.GenerateResult) -> Usage:
        return cls(prompt_tokens=result.usage.prompt_tokens, completion_tokens=result.usage.completion_tokens,
                   total_tokens=result.usage.total_tokens)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage

    @classmethod
    def of(cls, result: protocol.GenerateResult, model: str) -> Completion:
        choices = [CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason) for c in result.choices]
        return cls(id=result.id, created=result.created, model=model, choices=choices, usage=Usage.of(result))


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage

    @classmethod
    def of(cls, result: protocol.GenerateResult, model: str) -> ChatCompletion:
        choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
                   for c in result.choices]
        return cls(id=chat_id(result.id), created=result.created, model=model, choices=choices,
                   usage=Usage.of(result))


def chat_id(request_id: str) -> str:
    """A chat completion's id for the inference process's request id ("cmpl-..." -> "chatcmpl-...")."""
    return "chatcmpl-" + request_id.removeprefix("cmpl-")


# --- stream chunks (server-sent events) ---------------------------------------------------------
# Fields that OpenAI leaves out of a chunk when they do not apply (a delta's role after the first
# chunk of a choice, the usage before the last chunk) are dropped when None.


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatDelta(BaseModel):
    role: Annotated[Literal["assistant"] | None, Field(exclude_if=lambda v: v is None)] = None
    content: str


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Annotated[Usage | None, Field(exclude_if=lambda v: v is None)] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Annotated[Usage | None, Field(exclude_if=lambda v: v is None)] = None


class StreamError(BaseModel):
    """The event that ends a stream whose request failed after it began."""

    error: protocol.WireError


class ChunkEncoder:
    """Turns one request's stream of inference protocol chunks into OpenAI chunks, remembering which
    choices have begun (a chat choice's first chunk carries the assistant role)."""

    def __init__(self, *, model: str, chat: bool, created: int) -> None:
        self.model, self.chat, self.created = model, chat, created
        self._started: set[int] = set()

    def delta(self, item: protocol.DeltaChunk) -> CompletionChunk | ChatCompletionChunk:
        if not self.chat:
            text = CompletionChunkChoice(index=item.index, text=item.text, finish_reason=item.finish_reason)
            return CompletionChunk(id=item.id, created=self.created, model=self.model, choices=[text])
        role = None if item.index in self._started else "assistant"
        self._started.add(item.index)
        choice = ChatChunkChoice(index=item.index, delta=ChatDelta(role=role, content=item.text),
                                 finish_reason=item.finish_reason)
        return ChatCompletionChunk(id=chat_id(item.id), created=self.created, model=self.model, choices=[choice])

    def usage(self, result: protocol.GenerateResult) -> CompletionChunk | ChatCompletionChunk:
        """The last chunk of a stream asked to include usage: no choices, the request's usage."""
        if self.chat:
            return ChatCompletionChunk(id=chat_id(result.id), created=self.created, model=self.model, choices=[],
                                       usage=Usage.of(result))
        return CompletionChunk(id=result.id, created=self.created, model=self.model, choices=[],
                               usage=Usage.of(result))
