"""`tuneforge inference`: one process serving one base model over a small internal HTTP protocol.

The API forwards completions here; users never call it directly. Standard library only on the
HTTP side (the worker never imports fastapi), one thread per connection, every thread submitting
to the one InferenceEngine, which batches them.

The protocol (routes, the request, the result, the stream's chunks, the error body) is defined once,
in app/domains/serving/protocol.py, which the API uses too; an error answers its ErrorBody with the
error's status, so the API can relay it as it is. Adapters are resolved per request from the
database (the team's adapter row) and storage (its peft directory), then loaded by the engine on
demand, safetensors only.

The process registers (base model, URL) in the inference_endpoint table and refreshes a heartbeat
there; that is how the API finds it, on SQLite and on Postgres alike.

GET /metrics serves the engine's counters (worker.inference.stats.EngineCollector) to Prometheus.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError

from app.core import logs
from app.core.config import get_settings
from app.core.db import session_scope
from app.core.errors import InvalidRequest, NotFound, TuneforgeError
from app.domains.files import formats
from app.domains.base_models import service as base_models
from app.domains.base_models.errors import ModelNotFound
from app.domains.serving import protocol
from app.domains.serving import service as serving
from worker.inference.adapters import AdapterRef
from worker.inference.engine import InferenceEngine
from worker.inference.errors import AdapterNotFound
from worker.inference.results import Completion, Delta, Generation, TokenLogprob
from worker.inference.stats import EngineCollector
from worker.staging import stage_base, stage_tree

log = logging.getLogger("tuneforge.inference")

MAX_BODY_BYTES = 8 << 20
METRICS_PATH = "/metrics"  # Prometheus scrapes it here, beside the protocol's routes


def completion_result(completion: Completion) -> protocol.GenerateResult:
    """The engine's finished request as the protocol's result."""
    return protocol.GenerateResult(
        id=completion.id, created=completion.created, adapter_id=completion.adapter_id,
        choices=[protocol.Choice(index=c.index, text=c.text, token_ids=list(c.token_ids), finish_reason=c.finish_reason,
                                 logprobs=wire_logprobs(c.logprobs))
                 for c in completion.choices],
        usage=protocol.Usage(prompt_tokens=completion.usage.prompt_tokens,
                             completion_tokens=completion.usage.completion_tokens,
                             total_tokens=completion.usage.total_tokens),
        batch_id=completion.batch_id)


def wire_logprobs(entries: tuple[TokenLogprob, ...] | None) -> list[protocol.TokenLogprob] | None:
    if entries is None:
        return None
    return [protocol.TokenLogprob(token=e.token, token_id=e.token_id, logprob=e.logprob,
                                  top=[protocol.TopLogprob(token=t, logprob=lp) for t, lp in e.top]) for e in entries]


def wire_error(exc: TuneforgeError) -> protocol.WireError:
    return protocol.WireError(message=exc.message, type=exc.type, param=exc.param, code=exc.code)


def parse_request(body: dict) -> protocol.GenerateRequest:
    """The /v1/generate body as the protocol's request. Raises InvalidRequest naming the first field
    that is wrong."""
    try:
        return protocol.GenerateRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        raise InvalidRequest(f"{param + ': ' if param else ''}{message}.", param=param) from None


class InferenceService:
    """The engine plus what the HTTP layer needs around it: resolving adapters and parsing requests."""

    def __init__(self, engine: InferenceEngine, base_model: str) -> None:
        self.engine = engine
        self.base_model = base_model
        self.metrics = CollectorRegistry()
        self.metrics.register(EngineCollector(engine.stats))

    def adapter_ref(self, team_id: str, adapter_id: str | None) -> AdapterRef | None:
        """The team's adapter, or its checkpoint's adapter, as the engine sees it (serving.adapter_files). Raises
        NotFound when the row is missing or the team's right to it is gone (it was deleted after the API
        checked)."""
        if adapter_id is None:
            return None
        with session_scope() as session:
            found = serving.adapter_files(session, team_id=team_id, adapter_id=adapter_id)
        if found is None:
            raise NotFound(f"No such adapter: {adapter_id!r}.", param="model", code="model_not_found")
        base, files = found
        try:
            path = stage_tree(files)
        except FileNotFoundError:
            raise AdapterNotFound(f"adapter {adapter_id!r}: its files are missing from storage ({files}).",
                                  param="model") from None
        return AdapterRef(id=adapter_id, path=path, base=base)

    def encode_chat(self, messages: list, ref: AdapterRef | None, tools: list | None = None) -> str | list[int]:
        """The chat prompt rendered as training rendered it: token ids from the engine's chat template for
        the adapter, or, where neither the adapter nor the base has one, the text of the plain chat layout
        with the assistant turn opened (formats.plain_chat_prompt; tokenized with special tokens, as
        training did). Either way the messages are first given the fields training gives a template
        (formats.template_messages: a name, content parts as text)."""
        messages = formats.template_messages(messages)
        if self.engine.chat_template(ref):
            return self.engine.encode_chat(messages, ref, tools=tools)
        try:
            return formats.plain_chat_prompt(formats.plain_tool_messages(messages, tools))
        except formats.RecordInvalid:
            raise InvalidRequest("messages must be a non-empty list of {role, content} objects.",
                                 param="messages") from None

    def submit(self, request: protocol.GenerateRequest) -> Generation:
        """Queue a generation. Raises the engine's errors (bad parameters, an adapter of another base, a
        full queue)."""
        ref = self.adapter_ref(request.team_id, request.adapter_id)
        if request.messages is not None:
            prompt = self.encode_chat([m.model_dump() for m in request.messages], ref, request.tools)
        else:
            prompt = request.prompt
        return self.engine.submit(prompt, adapter=ref, **request.sampling())


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # the default writes every request to stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send_json(self, status: int, payload: BaseModel | dict) -> None:
        data = _json(payload)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, exc: TuneforgeError) -> None:
        self._send_json(exc.status_code, protocol.ErrorBody(error=wire_error(exc)))

    def do_GET(self) -> None:
        service = self.server.service
        if self.path == protocol.HEALTH_PATH:
            self._send_json(200, protocol.Health(base_model=service.base_model))
        elif self.path == protocol.STATS_PATH:
            self._send_json(200, service.engine.stats())
        elif self.path == METRICS_PATH:
            data = generate_latest(service.metrics)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self._send_error(NotFound(f"Unknown route {self.path}.", code="not_found"))

    def do_POST(self) -> None:
        service = self.server.service
        try:
            body = self._read_json()
            if self.path == protocol.GENERATE_PATH:
                self._generate(parse_request(body))
            elif self.path == protocol.PAUSE_PATH:
                service.engine.pause()
                self._send_json(200, {"paused": True})
            elif self.path == protocol.RESUME_PATH:
                service.engine.resume()
                self._send_json(200, {"paused": False})
            elif self.path.startswith(protocol.ADAPTERS_PATH) and self.path.endswith(protocol.EVICT_SUFFIX):
                adapter_id = unquote(self.path.removeprefix(protocol.ADAPTERS_PATH)
                                     .removesuffix(protocol.EVICT_SUFFIX))
                self._send_json(200, {"id": adapter_id, "evicted": service.engine.evict(adapter_id, timeout=60)})
            else:
                raise NotFound(f"Unknown route {self.path}.", code="not_found")
        except TuneforgeError as exc:
            self._send_error(exc)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:  # never a stack trace to the caller; the log has it
            log.exception("inference request failed")
            self._send_json(500, protocol.ErrorBody(error=protocol.WireError(
                message="Internal error in the inference process; it has been logged.", type="server_error",
                code="internal_error")))

    def _read_json(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise InvalidRequest(f"Request body over {MAX_BODY_BYTES} bytes.", code="too_large")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise InvalidRequest(f"The body is not JSON: {exc}.") from None
        if not isinstance(body, dict):
            raise InvalidRequest("The body must be a JSON object.")
        return body

    def _generate(self, request: protocol.GenerateRequest) -> None:
        generation = self.server.service.submit(request)
        if not request.stream:
            self._send_json(200, completion_result(generation.result()))
            return
        # The first delta (or the error) comes only once the adapter is loaded and the request admitted,
        # so a bad adapter still answers with its own status instead of a 200 stream that fails.
        stream = generation.stream()
        first = next(stream, None)
        self.send_response(200)
        self.send_header("Content-Type", protocol.STREAM_MEDIA_TYPE)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if first is not None:
                self._chunk(_delta_chunk(generation.id, first))
                for delta in stream:
                    self._chunk(_delta_chunk(generation.id, delta))
            self._chunk(protocol.DoneChunk(result=completion_result(generation.result())))
        except TuneforgeError as exc:
            self._chunk(protocol.ErrorChunk(error=wire_error(exc)))
        except (BrokenPipeError, ConnectionResetError):
            generation.cancel()
            return
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, payload: BaseModel) -> None:
        data = _json(payload) + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _delta_chunk(request_id: str, delta: Delta) -> protocol.DeltaChunk:
    return protocol.DeltaChunk(id=request_id, index=delta.index, text=delta.text, token_ids=list(delta.token_ids),
                               finish_reason=delta.finish_reason, logprobs=wire_logprobs(delta.logprobs))


def _json(payload: BaseModel | dict) -> bytes:
    return json.dumps(payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    service: InferenceService


class Registration:
    """The process's row in inference_endpoint, refreshed from a background thread until stopped."""

    def __init__(self, base_model: str, url: str) -> None:
        self.base_model = base_model
        self.url = url
        self._stop = threading.Event()
        with session_scope() as session:
            self.endpoint_id = serving.register(session, base_model=base_model, url=url).id
        self._thread = threading.Thread(target=self._beat, name="inference-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(serving.HEARTBEAT_SECONDS):
            try:
                with session_scope() as session:
                    if not serving.heartbeat(session, endpoint_id=self.endpoint_id):
                        self.endpoint_id = serving.register(session, base_model=self.base_model, url=self.url).id
            except Exception:  # a database blip: the next beat retries; the API sees a stale row meanwhile
                log.exception("inference heartbeat failed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        try:
            with session_scope() as session:
                serving.unregister(session, endpoint_id=self.endpoint_id)
        except Exception:
            log.exception("could not remove this process's inference_endpoint row")


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8100, advertise_url: str | None = None,
          **engine_kwargs) -> int:
    """Load the registered base model `model`, listen on host:port (0 picks a free port), register the
    URL (advertise_url, or http://host:port) and serve until SIGINT/SIGTERM. Returns an exit code."""
    logs.configure(get_settings().log_format)
    with session_scope() as session:
        base = base_models.get_base(session, model)
        if base is None:
            raise ModelNotFound(f"No base model named {model!r} is registered; register it with "
                                "`tuneforge models register NAME PATH`.", param="model")
        base_path = base.path
    engine = InferenceEngine(stage_base(base_path), base_name=model, **engine_kwargs)
    server = _Server((host, port), _Handler)
    server.service = InferenceService(engine, model)
    bound_port = server.server_address[1]
    if advertise_url is None:
        advertise_host = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
        advertise_url = f"http://{advertise_host}:{bound_port}"
    registration = Registration(model, advertise_url.rstrip("/"))

    def stop(*_) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"serving base model {model} ({engine.device}) at {advertise_url} (listening on {host}:{bound_port})",
          flush=True)
    try:
        server.serve_forever()
    finally:
        registration.close()
        server.server_close()
        engine.close()
    return 0
