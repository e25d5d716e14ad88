"""Fixtures shared by the worker tests, which run the training code in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from worker.training.tiny import make_tiny_model


@pytest.fixture(scope="session")
def base_path(tmp_path_factory) -> Path:
    """The tiny Llama model with random weights, built once; tests only read it."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture
def tokenizer(base_path):
    # A fresh instance per test: some tests change the pad token or template.
    return AutoTokenizer.from_pretrained(base_path, local_files_only=True)
