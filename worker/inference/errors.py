"""Errors of the inference engine, rendered by the API like every TuneforgeError.

Adapter errors fail only the requests that name that adapter; the engine keeps serving the rest."""

from __future__ import annotations

from app.core.errors import InvalidRequest, NotFound, TooLarge, TuneforgeError, Unavailable


class AdapterNotFound(NotFound):
    """The adapter's directory, adapter_config.json or adapter_model.safetensors is missing."""

    code = "adapter_not_found"


class AdapterCorrupt(TuneforgeError):
    """The adapter's files exist but cannot be read (bad JSON, truncated or invalid safetensors,
    missing or non-finite tensors). A fault of the stored files, not of the request."""

    status_code = 500
    type = "server_error"
    code = "adapter_corrupt"


class AdapterFormatRefused(InvalidRequest):
    """The adapter's weights are a pickle (adapter_model.bin, .pt, ...); only safetensors is loaded."""

    code = "adapter_format_refused"


class AdapterBaseMismatch(InvalidRequest):
    """The adapter was trained on another base model than the one this engine serves."""

    code = "adapter_base_mismatch"


class AdapterUnsupported(InvalidRequest):
    """The adapter is valid peft but uses a feature the engine does not serve (DoRA, non-LoRA
    methods, modules_to_save, LoRA on embeddings, LoRA bias)."""

    code = "adapter_unsupported"


class AdapterTooLarge(TooLarge):
    """The adapter alone is larger than the engine's adapter memory bound (max_adapter_bytes)."""

    code = "adapter_too_large"


class AdapterInUse(InvalidRequest):
    """An operator asked to evict an adapter that running requests still use."""

    status_code = 409
    code = "adapter_in_use"


class GenerationInvalid(InvalidRequest):
    """A generation request's parameters are out of range; `param` names the field."""

    code = "invalid_generation_request"


class GenerationCancelled(TuneforgeError):
    """The caller cancelled the request (e.g. the HTTP client went away) before it finished."""

    status_code = 499
    code = "cancelled"


class EngineClosed(Unavailable):
    """The engine was closed; it accepts no requests and failed those it still held."""

    code = "engine_closed"


class EngineOverloaded(Unavailable):
    """The engine's queue is full (max_queue); retry later."""

    code = "engine_overloaded"


class InferenceFailed(Unavailable):
    """The model's forward pass raised (e.g. out of memory); the requests in that batch fail,
    the engine keeps serving."""

    code = "inference_failed"
