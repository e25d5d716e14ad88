"""OpenAI-compatible completions and chat completions, served by the inference process of the
model's base.

The API checks the team's right to the model (another team's model answers 404, like a missing
one), finds the live inference processes for its base (serving domain), and forwards the request
over HTTP to the one its adapter is routed to, or the next if that one refuses the connection; it
never loads a model itself. stream=true answers server-sent events in OpenAI's chunk
shapes, ending with `data: [DONE]`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

import httpx
from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from app.api.deps import PrincipalDep, SessionDep
from app.domains.serving import service as serving
from app.domains.serving.errors import InferenceError, ModelNotServing

router = APIRouter(tags=["completions"])
log = logging.getLogger("tuneforge.api")

# Generation can take long on a CPU; connecting must not.
FORWARD_TIMEOUT = httpx.Timeout(600.0, connect=5.0)
# OpenAI's chat default is "up to the context"; a bound keeps an omitted max_tokens from running long.
CHAT_MAX_TOKENS = 256


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=255, description="A fine-tuned model of the team, or a base model.")
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class CompletionCreate(_Sampling):
    prompt: str | list[int] = Field(description="Text, or token ids of the base model's tokenizer.")
    max_tokens: Annotated[int, Field(ge=1)] | None = 16


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionCreate(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


_STREAM_RESPONSE = {200: {"content": {"text/event-stream": {}},
                          "description": "With stream=true: server-sent events, one chunk per piece of text, "
                                         "then `data: [DONE]`."}}


@router.post("/completions", response_model=Completion, responses=_STREAM_RESPONSE)
async def create_completion(body: CompletionCreate, session: SessionDep, principal: PrincipalDep):
    """Complete `prompt` with the model (temperature 0 is greedy)."""
    payload = {"prompt": body.prompt, "max_tokens": body.max_tokens}
    return await _forward(session, principal.team_id, body, payload, chat=False)


@router.post("/chat/completions", response_model=ChatCompletion, responses=_STREAM_RESPONSE)
async def create_chat_completion(body: ChatCompletionCreate, session: SessionDep, principal: PrincipalDep):
    """Answer the conversation. The prompt is rendered with the chat template saved with the fine-tuned
    model's tokenizer, the one its training used."""
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    max_tokens = body.max_completion_tokens or body.max_tokens or CHAT_MAX_TOKENS
    payload = {"messages": messages, "max_tokens": max_tokens}
    return await _forward(session, principal.team_id, body, payload, chat=True)


def _route(session, team_id: str, model: str) -> dict:
    """Resolve the model for the team and find its inference process: the forwarded request's head."""
    target = serving.resolve(session, team_id=team_id, model=model)
    adapter_id = target.adapter.id if target.adapter is not None else None
    endpoints = serving.endpoints_for(session, base_model=target.base_model, key=adapter_id or target.base_model)
    return {"urls": [e.url for e in endpoints], "base_model": target.base_model, "team_id": team_id,
            "adapter_id": adapter_id}


async def _forward(session, team_id: str, body: _Sampling, payload: dict, *, chat: bool):
    route = await run_in_threadpool(_route, session, team_id, body.model)
    payload |= {"team_id": route["team_id"], "adapter_id": route["adapter_id"], "stream": bool(body.stream)}
    payload |= {k: getattr(body, k) for k in ("temperature", "top_p", "n", "stop", "seed")
                if getattr(body, k) is not None}
    response, client = await _send(route, payload, stream=bool(body.stream))
    if response.status_code != 200:
        await response.aread()
        await client.aclose()
        raise _relayed(response)
    if not body.stream:
        await client.aclose()
        return _render(response.json(), body.model, chat)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_events(client, response, body.model, chat, include_usage),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _send(route: dict, payload: dict, *, stream: bool) -> tuple[httpx.Response, httpx.AsyncClient]:
    """POST the request to the route's first reachable process. A process that refuses the
    connection (one that died and whose row has not gone stale yet) is skipped: nothing reached
    it, so the next one may take the request. Any other transport failure ends the request."""
    failures = []
    for url in route["urls"]:
        client = httpx.AsyncClient(base_url=url, timeout=FORWARD_TIMEOUT)
        try:
            return await client.send(client.build_request("POST", "/v1/generate", json=payload), stream=stream), client
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            await client.aclose()
            failures.append(f"{url} ({type(exc).__name__})")
            log.warning("inference process %s not reachable: %s", url, exc)
        except httpx.TransportError as exc:
            await client.aclose()
            raise ModelNotServing(f"The inference process for base model {route['base_model']!r} at {url} failed "
                                  f"({type(exc).__name__}); retry shortly.", param="model") from None
    raise ModelNotServing(f"No inference process for base model {route['base_model']!r} is reachable: "
                          f"{', '.join(failures)}; retry shortly.", param="model")


def _relayed(response: httpx.Response) -> InferenceError:
    try:
        error = response.json()["error"]
        return InferenceError(error["message"], status_code=response.status_code, type=error["type"],
                              param=error.get("param"), code=error.get("code"))
    except (ValueError, KeyError, TypeError):
        return InferenceError(f"The inference process answered {response.status_code}.", status_code=502,
                              type="server_error", code="bad_gateway")


def _usage(result: dict) -> dict:
    return {k: result["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def _render(result: dict, model: str, chat: bool) -> Completion | ChatCompletion:
    if chat:
        choices = [ChatChoice(index=c["index"], message=AssistantMessage(content=c["text"]),
                              finish_reason=c["finish_reason"]) for c in result["choices"]]
        return ChatCompletion(id=_chat_id(result["id"]), created=result["created"], model=model, choices=choices,
                              usage=Usage(**_usage(result)))
    choices = [CompletionChoice(index=c["index"], text=c["text"], finish_reason=c["finish_reason"])
               for c in result["choices"]]
    return Completion(id=result["id"], created=result["created"], model=model, choices=choices,
                      usage=Usage(**_usage(result)))


def _chat_id(request_id: str) -> str:
    return "chatcmpl-" + request_id.removeprefix("cmpl-")


async def _events(client: httpx.AsyncClient, response: httpx.Response, model: str, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    """The inference process's NDJSON lines as OpenAI stream chunks."""
    created = int(time.time())
    started: set[int] = set()
    try:
        async for line in response.aiter_lines():
            if not line:
                continue
            item = json.loads(line)
            if item["type"] == "error":
                yield _sse({"error": item["error"]})
                return
            if item["type"] == "done":
                result = item["result"]
                if include_usage:
                    yield _sse(_chunk(result["id"], created, model, chat, [], usage=_usage(result)))
                yield "data: [DONE]\n\n"
                return
            index = item["index"]
            if chat:
                delta = {"content": item["text"]}
                if index not in started:
                    delta = {"role": "assistant", **delta}
                started.add(index)
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": item["finish_reason"]}
            else:
                choice = {"index": index, "text": item["text"], "logprobs": None,
                          "finish_reason": item["finish_reason"]}
            yield _sse(_chunk(item["id"], created, model, chat, [choice]))
    finally:
        await response.aclose()
        await client.aclose()


def _chunk(request_id: str, created: int, model: str, chat: bool, choices: list[dict], usage: dict | None = None):
    return {"id": _chat_id(request_id) if chat else request_id,
            "object": "chat.completion.chunk" if chat else "text_completion", "created": created, "model": model,
            "choices": choices, **({"usage": usage} if usage is not None else {})}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
