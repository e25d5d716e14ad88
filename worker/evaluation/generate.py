"""Generating completions for code tasks with a base model, optionally with a LoRA adapter, and
measuring its loss on a general held-out text (the forgetting check).

A task is put to the model in the evaluation's prompt style (formats.PromptStyle): chat renders the
task's messages with the tokenizer's chat template (or the plain chat layout where it has none) and
lets the answer run to the model's end of turn; completion gives the plain prompt and cuts the
continuation at the task format's stop sequences."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from app.domains.evaluations import extract
from app.domains.evaluations.spec import SamplingSpec
from app.domains.files import formats
from app.domains.files.formats import PromptStyle
from worker.evaluation.harness import Sample

# Where a completion-style continuation ends when the settings give no stop sequences (HumanEval's
# usual ones). A chat answer ends at the model's end of turn instead: it may hold prose, several
# functions and examples, and the harness takes its code out (app/domains/evaluations/extract.py).
STOPS = {
    "humaneval": ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"),
    "mbpp": ("\nassert", "\nif __name__", "\nprint(", "\n\n\n"),
}


@dataclass(frozen=True)
class Prompt:
    """A code task as each prompt style gives it: `text` (completion) and `messages` (chat)."""

    task_id: str
    text: str
    format: str  # "humaneval" | "mbpp"
    messages: tuple[Mapping[str, str], ...] = ()


def _device_and_dtype():
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


def load(base_path: Path, adapter_dir: Path | None, *, quantized: bool = False):
    """(model, tokenizer) in eval mode: the base, with the adapter attached when given. The adapter's
    own tokenizer files are used when present (the chat template training used travels with it).

    quantized loads the base 4-bit as QLoRA training loads it: bitsandbytes NF4 with double
    quantization and bf16 compute (worker.training.model.quantization_config of the paper's
    defaults), the layers left unquantized in the dtype a 16-bit evaluation uses, with the CPU
    weight repacking of bitsandbytes turned off on every Linear4bit before the first forward
    (worker.training.model.disable_cpu_weight_repacking says why)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = _device_and_dtype()
    tok_dir = adapter_dir if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").exists() else base_path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues the prompt's last token
    if quantized:
        import torch

        from app.domains.jobs.spec import QuantizationSpec
        from worker.training.model import disable_cpu_weight_repacking, quantization_config

        # A 4-bit model is placed by device_map when it loads; it cannot be moved with .to() after.
        model = AutoModelForCausalLM.from_pretrained(
            base_path, local_files_only=True, dtype=dtype, quantization_config=quantization_config(QuantizationSpec()),
            device_map={"": torch.cuda.current_device()} if device == "cuda" else None)
        disable_cpu_weight_repacking(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True, dtype=dtype).to(device)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval(), tokenizer


def base_weights(model) -> dict:
    """How the model's base weights are held, for an evaluation's result: the dtype of its
    unquantized weights and how many of its linear layers are bitsandbytes 4-bit."""
    import sys

    bnb = sys.modules.get("bitsandbytes")  # not imported: no 4-bit layer can exist
    four_bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) if bnb is not None else 0
    return {"quantized": four_bit > 0, "linear4bit_layers": four_bit,
            "dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")}


def truncate(text: str, stops: tuple[str, ...]) -> str:
    cut = min((i for s in stops if (i := text.find(s)) != -1), default=len(text))
    return text[:cut]


def prompt_style(tokenizer, settings: SamplingSpec) -> PromptStyle:
    """The prompt style the settings ask for with this tokenizer (auto: chat when it has a chat
    template): what an evaluation's result records."""
    return formats.resolve_prompt_style(settings.prompt_style, has_chat_template=tokenizer.chat_template is not None)


def render(tokenizer, prompt: Prompt, style: PromptStyle) -> str:
    """The text the model reads for a task: the plain prompt (completion), or the task's messages with
    the assistant's turn opened, through the chat template, or the plain chat layout where the
    tokenizer has none, as training and serving render a chat (chat)."""
    if style == PromptStyle.COMPLETION:
        return prompt.text
    messages = [dict(m) for m in prompt.messages] or [{"role": "user", "content": prompt.text}]
    if tokenizer.chat_template is None:
        return formats.plain_chat_prompt(messages)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _end_of_turn_ids(model, tokenizer) -> list[int]:
    """The token ids that end an answer: the model's generation eos (one id or several) and the
    tokenizer's eos."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in [*ids, tokenizer.eos_token_id] if i is not None))


def _stop_at_closed_block(tokenizer, prompt_tokens: int):
    """A stopping criterion for chat answers: a row is done once its first Python block is closed
    (extract.python_block_closed). What an instruct model writes after its code (explanations,
    examples, repetition) is never run, and on a small model it is most of the tokens."""
    import torch
    from transformers import StoppingCriteria

    class _ClosedBlock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # input_ids: (rows, prompt + new tokens)
            answers = tokenizer.batch_decode(input_ids[:, prompt_tokens:], skip_special_tokens=True)
            return torch.tensor([extract.python_block_closed(a) for a in answers], dtype=torch.bool,
                                device=input_ids.device)

    return _ClosedBlock()


def generate(model, tokenizer, prompts: list[Prompt], settings: SamplingSpec, *, batch_size: int = 16,
             seed: int = 0, stop: Callable[[], None] | None = None) -> tuple[list[Sample], float]:
    """settings.n completions per prompt, in the settings' prompt style (prompt_style): chat answers
    end at the model's end of turn or once their first Python block is closed, completion-style
    continuations are cut at the task format's stop sequences; settings.stop, when given, cuts both.
    stop() is called before each batch of prompts; what it raises ends generation. Returns
    (samples, seconds)."""
    import torch
    from transformers import StoppingCriteriaList

    torch.manual_seed(seed)
    start = time.monotonic()
    samples: list[Sample] = []
    sampling = settings.temperature > 0
    style = prompt_style(tokenizer, settings)
    # A chat template writes the bos token itself: tokenizing with special tokens would double it.
    special = style == PromptStyle.COMPLETION or tokenizer.chat_template is None
    eos = _end_of_turn_ids(model, tokenizer)
    for i in range(0, len(prompts), batch_size):
        if stop is not None:
            stop()
        batch = prompts[i:i + batch_size]
        texts = [render(tokenizer, p, style) for p in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special).to(model.device)
        prompt_tokens = enc["input_ids"].shape[1]
        stopping = StoppingCriteriaList(
            [_stop_at_closed_block(tokenizer, prompt_tokens)] if style == PromptStyle.CHAT else [])
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=settings.max_tokens, do_sample=sampling,
                temperature=settings.temperature if sampling else None, top_p=settings.top_p if sampling else None,
                num_return_sequences=settings.n, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                stopping_criteria=stopping)
        new_tokens = out[:, prompt_tokens:]  # (batch * n, <= max_tokens)
        answers = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for j, text in enumerate(answers):
            prompt = batch[j // settings.n]
            if settings.stop:
                stops = settings.stop
            else:
                stops = () if style == PromptStyle.CHAT else STOPS[prompt.format]
            samples.append(Sample(task_id=prompt.task_id, completion=truncate(text, stops),
                                  completion_id=j % settings.n))
    return samples, time.monotonic() - start


def heldout_texts(count: int = 24, chars: int = 1200) -> list[str]:
    """General English text no code-task adapter trains on: Python's own help topics, which ship
    with every Python (pydoc_data), taken in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[name][:chars] for name in sorted(topics)[:count]]


def heldout_loss(model, tokenizer, texts: list[str], max_length: int = 256) -> float:
    """Mean next-token loss (nats/token) over the texts."""
    import torch

    total, tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
        ids = ids.to(model.device)  # (1, seq)
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    return total / max(tokens, 1)
