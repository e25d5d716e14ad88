"""The API's client of the inference processes (app/domains/serving/protocol.py): forwarding a
generation to the first reachable process, relaying its errors with their own status, relaying its
stream as OpenAI's server-sent events, and reading the processes' counters."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence

import httpx
from pydantic import BaseModel, ValidationError

from app.domains.serving import protocol
from app.domains.serving.errors import InferenceError, ModelNotServing
from app.domains.serving.schemas import ChunkEncoder, StreamError

log = logging.getLogger("tuneforge.api")

# Generation can take long on a CPU; connecting must not.
FORWARD_TIMEOUT = httpx.Timeout(600.0, connect=5.0)
STATS_TIMEOUT = httpx.Timeout(10.0, connect=2.0)


class Forwarded:
    """A generation a process accepted (status 200): its result, or with stream=true its stream.
    The caller reads it once (result() or events()), which closes the connection."""

    def __init__(self, client: httpx.AsyncClient, response: httpx.Response) -> None:
        self._client, self._response = client, response

    async def result(self) -> protocol.GenerateResult:
        try:
            await self._response.aread()
            return protocol.GenerateResult.model_validate_json(self._response.content)
        finally:
            await self.aclose()

    async def events(self, *, model: str, chat: bool, include_usage: bool,
                     parse_tools: bool = False) -> AsyncIterator[str]:
        """The process's stream as OpenAI stream chunks (server-sent events), ending with
        `data: [DONE]`, or with an error event when the request failed after the stream began. With
        parse_tools, tool calls in a chat answer stream as tool_calls deltas (ChunkEncoder)."""
        encoder = ChunkEncoder(model=model, chat=chat, created=int(time.time()), parse_tools=parse_tools)
        try:
            async for line in self._response.aiter_lines():
                if not line:
                    continue
                item = protocol.STREAM_CHUNK.validate_json(line)
                if isinstance(item, protocol.ErrorChunk):
                    yield _sse(StreamError(error=item.error))
                    return
                if isinstance(item, protocol.DoneChunk):
                    if include_usage:
                        yield _sse(encoder.usage(item.result))
                    yield "data: [DONE]\n\n"
                    return
                yield _sse(encoder.delta(item))
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self._response.aclose()
        await self._client.aclose()


async def generate(urls: Sequence[str], request: protocol.GenerateRequest, *, base_model: str) -> Forwarded:
    """POST the request to the first reachable process of `urls` (the order to try them). A process that
    refuses the connection (one that died and whose row has not gone stale yet) is skipped: nothing
    reached it, so the next one may take the request. Raises ModelNotServing when none is reachable or
    another transport failure ends the request, and InferenceError with the process's own status for
    an error it answered."""
    payload = request.model_dump(mode="json", exclude_none=True)
    failures = []
    for url in urls:
        client = httpx.AsyncClient(base_url=url, timeout=FORWARD_TIMEOUT)
        try:
            response = await client.send(client.build_request("POST", protocol.GENERATE_PATH, json=payload),
                                         stream=request.stream)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            await client.aclose()
            failures.append(f"{url} ({type(exc).__name__})")
            log.warning("inference process %s not reachable: %s", url, exc)
            continue
        except httpx.TransportError as exc:
            await client.aclose()
            raise ModelNotServing(f"The inference process for base model {base_model!r} at {url} failed "
                                  f"({type(exc).__name__}); retry shortly.", param="model") from None
        if response.status_code != 200:
            await response.aread()
            await client.aclose()
            raise _relayed(response)
        return Forwarded(client, response)
    raise ModelNotServing(f"No inference process for base model {base_model!r} is reachable: "
                          f"{', '.join(failures)}; retry shortly.", param="model")


async def stats(urls: Sequence[str]) -> list[dict | str]:
    """Each process's counters, or why they are missing (an exception, or the status it answered)."""
    async with httpx.AsyncClient(timeout=STATS_TIMEOUT) as client:
        answers = await asyncio.gather(*(client.get(f"{url}{protocol.STATS_PATH}") for url in urls),
                                       return_exceptions=True)
    out: list[dict | str] = []
    for answer in answers:
        if isinstance(answer, httpx.Response) and answer.status_code == 200:
            out.append(answer.json())
        elif isinstance(answer, httpx.Response):
            out.append(f"answered {answer.status_code}")
        else:
            out.append(f"{type(answer).__name__}: {answer}")
    return out


def _relayed(response: httpx.Response) -> InferenceError:
    try:
        error = protocol.ErrorBody.model_validate_json(response.content).error
    except ValidationError:
        return InferenceError(f"The inference process answered {response.status_code}.", status_code=502,
                              type="server_error", code="bad_gateway")
    return InferenceError(error.message, status_code=response.status_code, type=error.type, param=error.param,
                          code=error.code)


def _sse(payload: BaseModel) -> str:
    return f"data: {json.dumps(payload.model_dump(mode='json'))}\n\n"
