"""The gathered-matmul LoRA path against peft's own mixed-adapter forward, at the logits."""

from __future__ import annotations

import torch

from tests.worker.inference.conftest import PROMPTS
from worker.inference.adapters import LinearShape, inspect_adapter
from worker.inference.lora import BatchedLora, load_lora


def test_gathered_lora_logits_match_peft_adapter_names(tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.base, local_files_only=True)
    tokenizer.padding_side = "left"
    rows = ["a", None, "c", "b", "a", "c"]
    enc = tokenizer([PROMPTS[i % 3] for i in range(len(rows))], return_tensors="pt", padding=True)
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)

    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny.base, local_files_only=True), tiny.adapters["a"], adapter_name="a")
    for name in ("b", "c"):
        peft_model.load_adapter(tiny.adapters[name], adapter_name=name)
    peft_model.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny.base, local_files_only=True).eval()
    linears = {n: LinearShape(m.in_features, m.out_features)
               for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    lora = BatchedLora(base)
    for name in ("a", "b", "c"):
        spec = inspect_adapter(tiny.ref(name), base_name="tiny", base_linears=linears)
        lora.add(name, load_lora(spec, torch.device("cpu")))

    with torch.inference_mode():
        expected = peft_model(**enc, position_ids=positions,
                              adapter_names=[r or "__base__" for r in rows]).logits
        lora.use(rows)
        mixed = base(**enc, position_ids=positions).logits
        lora.use(["b"] * len(rows))
        single = base(**enc, position_ids=positions).logits
        lora.clear()
        plain = base(**enc, position_ids=positions).logits
        single_expected = peft_model(**enc, position_ids=positions, adapter_names=["b"] * len(rows)).logits

    # Every row its own adapter, in order (the plan skips the per-row gather).
    distinct = ["a", "b", "c", None]
    sub = {k: v[:4] for k, v in enc.items()}
    with torch.inference_mode():
        lora.use(distinct)
        gathered = base(**sub, position_ids=positions[:4]).logits
        lora.clear()
        expected_distinct = peft_model(**sub, position_ids=positions[:4],
                                       adapter_names=[r or "__base__" for r in distinct]).logits

    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(mixed[mask], expected[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gathered[mask[:4]], expected_distinct[mask[:4]], rtol=1e-5, atol=1e-5)
    # One adapter for all rows runs peft's own arithmetic on the same tensors: identical bits.
    assert torch.equal(single[mask], single_expected[mask])
    base_rows = [i for i, r in enumerate(rows) if r is None]
    assert torch.equal(mixed[base_rows][mask[base_rows]], plain[base_rows][mask[base_rows]])
