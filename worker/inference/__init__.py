"""Serving: one base model in memory, LoRA adapters loaded on demand into an LRU cache, requests for
different adapters sharing a batch. InferenceEngine is the in-process API an HTTP layer wraps."""

from worker.inference.adapters import AdapterRef
from worker.inference.engine import InferenceEngine
from worker.inference.results import Choice, Completion, Delta, Generation, Usage

__all__ = ["AdapterRef", "Choice", "Completion", "Delta", "Generation", "InferenceEngine", "Usage"]
