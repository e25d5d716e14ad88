"""The inference process's request handling on the real engine: chat prompts rendered as training
rendered them."""

from __future__ import annotations

import shutil

from worker.inference import AdapterRef, InferenceEngine
from worker.inference.server import InferenceService
from worker.training.data import chat_text_and_targets

QUESTION = {"role": "user", "content": "Write a function to add two numbers."}
ANSWER = {"role": "assistant", "content": "def add(a, b):\n    return a + b"}


def _untemplated_engine(tiny, tmp_path) -> InferenceEngine:
    """An engine on a copy of the tiny base whose tokenizer has no chat template (the plain layout)."""
    from transformers import AutoTokenizer

    base = tmp_path / "untemplated"
    shutil.copytree(tiny.base, base)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    tokenizer.chat_template = None
    (base / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    return InferenceEngine(base, base_name="untemplated", warmup=False)


def test_chat_prompt_without_any_template_opens_the_turn_training_learned(tiny, tmp_path):
    engine = _untemplated_engine(tiny, tmp_path)
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



# A template that renders a message's name, as tool-aware and multi-speaker templates do.
NAMED_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}{% if m['name'] is defined %} {{ m['name'] }}{% endif %}|>\n"
                  "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
NAMED_MESSAGES = [
    {"role": "system", "content": [{"type": "text", "text": "You write "}, {"type": "text", "text": "Python."}]},
    {"role": "user", "name": "ada", "content": "Write a function to add two numbers."},
    {"role": "assistant", "name": "coder", "content": [{"type": "text", "text": "Here:"}]},
    {"role": "user", "name": "ada",
     "content": [{"type": "text", "text": "Now "}, {"type": "text", "text": "subtract."}]},
]


def _forwarded(messages: list[dict]) -> list[dict]:
    """The messages of an OpenAI chat request as the API forwards them to the inference process."""
    from app.domains.serving.schemas import ChatCompletionCreate

    body = ChatCompletionCreate.model_validate({"model": "m", "messages": messages})
    request = body.generate_request(team_id="team-x", adapter_id=None)
    assert request.messages is not None
    return [m.model_dump() for m in request.messages]


def test_names_and_content_parts_render_the_same_prompt_in_serving_as_in_training(tiny, make_engine, tmp_path):
    from transformers import AutoTokenizer

    adapter = tmp_path / "named"
    shutil.copytree(tiny.adapters["a"], adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter, local_files_only=True)
    tokenizer.chat_template = NAMED_TEMPLATE
    tokenizer.save_pretrained(adapter)
    engine = make_engine(warmup=False)
    ref = AdapterRef(id="ad-named", path=adapter, base="tiny")
    forwarded = _forwarded(NAMED_MESSAGES)
    assert forwarded[0]["content"] == "You write Python." and forwarded[1]["name"] == "ada"

    served = InferenceService(engine, "tiny").encode_chat(forwarded, ref)
    trained_text, spans = chat_text_and_targets([*NAMED_MESSAGES, ANSWER], tokenizer)
    prompt_text = trained_text[:spans[-1][0]]
    assert "<|user ada|>\n" in prompt_text and "<|assistant coder|>\nHere:\n" in prompt_text
    assert "You write Python." in prompt_text and "Now subtract." in prompt_text
    assert served == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]


def test_names_and_content_parts_render_the_same_plain_layout_in_serving_as_in_training(tiny, tmp_path):
    engine = _untemplated_engine(tiny, tmp_path)
    try:
        served = InferenceService(engine, "untemplated").encode_chat(_forwarded(NAMED_MESSAGES), None)
        trained_text, spans = chat_text_and_targets([*NAMED_MESSAGES, ANSWER], engine.tokenizer)
        assert isinstance(served, str) and served == trained_text[:spans[-1][0]]
        assert "Now subtract.\n" in served
    finally:
        engine.close()
