"""Prompts in each style, generation through the chat template, and the 4-bit load, on the tiny local model."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from app.domains.evaluations.spec import SamplingSpec
from app.domains.files import formats
from app.domains.files.formats import RecordFormat
from app.domains.jobs.spec import QuantizationSpec
from worker.evaluation.generate import Prompt, _device_and_dtype, base_weights, generate, load, prompt_style, render

MBPP = {"text": "Add two numbers.", "code": "def add(a, b):\n    return a + b", "test_list": ["assert add(1, 2) == 3"]}


def _prompt(task_id: str = "1") -> Prompt:
    return Prompt(task_id=task_id, text=formats.task_prompt(MBPP, RecordFormat.MBPP), format="mbpp",
                  messages=tuple(formats.task_messages(MBPP, RecordFormat.MBPP)))


def test_auto_is_chat_for_a_tokenizer_with_a_chat_template_and_completion_without(tokenizer):
    assert tokenizer.chat_template is not None  # the tiny model ships one
    assert prompt_style(tokenizer, SamplingSpec()) == "chat"
    assert prompt_style(tokenizer, SamplingSpec(prompt_style="completion")) == "completion"
    tokenizer.chat_template = None
    assert prompt_style(tokenizer, SamplingSpec()) == "completion"


def test_a_chat_prompt_is_the_tasks_messages_through_the_chat_template(tokenizer):
    messages = formats.task_messages(MBPP, RecordFormat.MBPP)
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert render(tokenizer, _prompt(), formats.PromptStyle.CHAT) == expected
    assert render(tokenizer, _prompt(), formats.PromptStyle.COMPLETION) == formats.task_prompt(MBPP, RecordFormat.MBPP)
    tokenizer.chat_template = None  # chat asked for without a template: the plain chat layout
    assert render(tokenizer, _prompt(), formats.PromptStyle.CHAT) == formats.plain_chat_prompt(messages)


@pytest.mark.parametrize("style", ["chat", "completion"])
def test_generation_continues_the_rendered_prompt_greedily(base_path, style):
    model, tokenizer = load(base_path, None)
    settings = SamplingSpec(max_tokens=12, prompt_style=style)
    [sample], seconds = generate(model, tokenizer, [_prompt()], settings)
    text = render(tokenizer, _prompt(), formats.PromptStyle(style))
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=style == "completion")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    written = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert seconds > 0 and sample.task_id == "1"
    if style == "chat":
        assert sample.completion == written  # to the end of turn: no completion-style stop sequences
    else:
        assert written.startswith(sample.completion)


def test_a_chat_answer_stops_once_its_first_python_block_is_closed(tokenizer):
    from worker.evaluation.generate import _stop_at_closed_block

    prompt = tokenizer("Write f.\n", return_tensors="pt")["input_ids"]
    answers = ["Sure:\n```python\ndef f():\n    return 1\n```\nThis function", "Sure:\n```python\ndef f():\n",
               "Output:\n```text\n1\n```\n"]
    rows = [torch.cat([prompt[0], tokenizer(a, return_tensors="pt", add_special_tokens=False)["input_ids"][0]])
            for a in answers]
    width = max(len(r) for r in rows)
    batch = torch.stack([torch.cat([r, r.new_full((width - len(r),), tokenizer.pad_token_id)]) for r in rows])
    done = _stop_at_closed_block(tokenizer, prompt.shape[1])(batch, None)
    assert done.tolist() == [True, False, False]  # closed; still open; a closed block that is no Python


def test_the_quantized_load_is_the_4bit_nf4_base_with_the_adapter_attached(base_path, tmp_path):
    adapter_dir = tmp_path / "adapter"
    fresh = AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True)
    get_peft_model(fresh, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")) \
        .save_pretrained(adapter_dir)
    model, tokenizer = load(base_path, adapter_dir, quantized=True)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert isinstance(model, PeftModel) and layers
    spec = QuantizationSpec()  # what QLoRA training loads: NF4, double quantization, bf16 compute
    for layer in layers:
        state = layer.weight.quant_state
        assert state.quant_type == spec.type == "nf4" and state.nested is spec.double_quant is True
        assert layer.compute_dtype == torch.bfloat16
        assert layer.support_avx512bf16_for_cpu is False  # repacking off before the first forward
    dtype = str(_device_and_dtype()[1]).removeprefix("torch.")  # the unquantized layers', as a 16-bit evaluation's
    assert base_weights(model) == {"quantized": True, "linear4bit_layers": len(layers), "dtype": dtype}
    samples, _ = generate(model, tokenizer, [_prompt()], SamplingSpec(max_tokens=6))
    assert len(samples) == 1
    plain, _ = load(base_path, adapter_dir)
    assert base_weights(plain) == {"quantized": False, "linear4bit_layers": 0, "dtype": dtype}
