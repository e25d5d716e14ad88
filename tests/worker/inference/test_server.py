"""The inference process's request handling on the real engine: chat prompts rendered as training
rendered them."""

from __future__ import annotations

import shutil

from worker.inference import InferenceEngine
from worker.inference.server import InferenceService
from worker.training.data import chat_text_and_targets

QUESTION = {"role": "user", "content": "Write a function to add two numbers."}
ANSWER = {"role": "assistant", "content": "def add(a, b):\n    return a + b"}


def test_chat_prompt_without_any_template_opens_the_turn_training_learned(tiny, tmp_path):
    from transformers import AutoTokenizer

    base = tmp_path / "untemplated"
    shutil.copytree(tiny.base, base)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    tokenizer.chat_template = None
    (base / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    engine = InferenceEngine(base, base_name="untemplated", warmup=False)
    try:
        assert engine.tokenizer.chat_template is None
        prompt = InferenceService(engine, "untemplated").encode_chat([QUESTION], None)
        trained_text, spans = chat_text_and_targets([QUESTION, ANSWER], engine.tokenizer)
        # The prompt is exactly the training text before the assistant's answer.
        assert isinstance(prompt, str) and trained_text[:spans[0][0]] == prompt
        assert engine.submit(prompt, max_tokens=4, temperature=0).result(60).usage.prompt_tokens == len(
            engine.tokenizer(prompt)["input_ids"])
    finally:
        engine.close()

