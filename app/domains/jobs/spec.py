"""The training spec: the paper's QLoRA recipe as defaults, every field overridable.

Validated once at job creation and stored on the job row; the worker rebuilds it
from there and never reads the environment. pydantic only: shared by app and worker.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.domains.evaluations.spec import JobEvalSpec
from app.domains.files.formats import PromptStyle

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


# The most training processes one job may ask for (training.processes): one machine's GPUs.
MAX_PROCESSES = 8


class _Frozen(BaseModel):
    # allow_inf_nan=False: "Infinity" or "nan" sent as a string would otherwise become a float.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


# target_modules meaning every linear layer but the output layer (peft's own keyword).
ALL_LINEAR = ("all-linear",)


class LoraSpec(_Frozen):
    r: int = Field(8, ge=1, le=512, description="LoRA rank.")
    alpha: int = Field(32, ge=1, le=4096, description="lora_alpha; the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj"), min_length=1, max_length=64,
        description='Names of the linear layers to adapt, or ["all-linear"]: every linear layer but the output '
                    "layer (peft's all-linear).",
    )
    bias: Literal["none", "all", "lora_only"] = "none"

    @field_validator("target_modules")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if ALL_LINEAR[0] in v:
            if v != ALL_LINEAR:
                raise ValueError('"all-linear" stands alone: it already names every linear layer')
            return v
        for name in v:
            if not _MODULE_NAME.match(name):
                raise ValueError(f"{name!r} is not a module name (e.g. 'q_proj')")
        if len(set(v)) != len(v):
            raise ValueError("target_modules has duplicates")
        return v


class QuantizationSpec(_Frozen):
    bits: Literal[4, 8] | None = Field(
        4, description="4 (QLoRA: bitsandbytes 4-bit base), 8 (bitsandbytes int8 base), or null for plain LoRA on "
                       "the unquantized base. Both bit widths run on GPU and on CPU.",
    )
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (bits 4 only).")
    double_quant: bool = Field(True, description="Also quantize the 4-bit quantization constants (bits 4 only).")
    compute_dtype: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="dtype the 4-bit weights are dequantized to for each matmul (bits 4 only).",
    )


class TrainingSettings(_Frozen):
    epochs: int = Field(4, ge=1, le=100)
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="Stop after this many optimizer steps.")
    batch_size: int = Field(1, ge=1, le=1024, description="Examples per micro-batch.")
    gradient_accumulation_steps: int = Field(8, ge=1, le=4096)
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    optimizer: Literal[
        "paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch", "adamw_torch_fused"
    ] = Field(
        "paged_adamw_8bit",
        description="The bitsandbytes optimizers (paged_*, adamw_8bit) run as given on GPU; on CPU, where paging "
                    "does not exist and 8-bit AdamW steps LoRA-sized parameters ~15x slower than torch's fused "
                    "AdamW, adamw_torch_fused is used instead (and announced in the job's events).",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Mixed-precision autocast. auto: bf16 where the hardware has it (Ampere+ GPU; CPU "
                            "with AVX512-BF16 or AMX), fp16 on older GPUs, fp32 on other CPUs. fp16 is GPU-only.",
    )
    max_seq_length: int = Field(1024, ge=8, le=131_072, description="Longer examples are truncated.")
    save_total_limit: int = Field(3, ge=1, le=100, description="Checkpoints kept.")
    checkpoint_every_steps: int | None = Field(
        50, ge=1, le=10_000_000,
        description="Save a resumable checkpoint (adapter, optimizer, scheduler, RNG, data position) to storage "
                    "every this many optimizer steps, so a job whose worker dies loses at most that many; null: "
                    "only when the job is paused or its worker shuts down. A retried or resumed job continues "
                    "from the latest one.",
    )
    keep_checkpoints: int = Field(3, ge=1, le=20, description="Stored checkpoints kept per job; older ones are "
                                                              "deleted as new ones are written.")
    logging_steps: int = Field(1, ge=1, le=100_000)
    prompt_style: PromptStyle = Field(
        PromptStyle.AUTO, description="How MBPP and HumanEval records are laid out. chat: the task as a user turn "
                                      "and its reference code in a fenced block as the assistant's, through the "
                                      "tokenizer's chat template; completion: a plain prompt continued by the code. "
                                      "auto: chat when the tokenizer has a chat template, else completion. Other "
                                      "formats are laid out as they are either way.",
    )
    completion_only_loss: bool = Field(
        True, description="Compute the loss only on what the model should write: completions (prompt/completion), "
                          "assistant turns (chat), solutions (HumanEval, MBPP); prompt tokens get label -100. "
                          "Plain text records train on every token either way.",
    )
    packing: bool | Literal["auto"] = Field(
        "auto", description="Padding-free batches: a micro-batch's examples are concatenated into one row with "
                            "position ids restarting per example, and attention never crosses examples; no "
                            "padding is computed. auto: on whenever a micro-batch holds more than one example (on "
                            "CPU too: 1.2x the tokens/s of padded length-grouped batches of 4 on a 30M model).",
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding when a micro-batch holds more "
                          "than one example and packing is off).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass instead of keeping them: less memory, "
                           "~1.5x slower per step (more on small models). Off unless memory needs it.",
    )
    lean_activations: bool = Field(
        True, description="Memory-lean RMSNorm and SwiGLU for Llama, Mistral and Qwen2 models: identical "
                          "outputs, and the backward pass recomputes their cheap elementwise parts instead of "
                          "keeping them (about 35% less activation memory). Other architectures are unaffected.",
    )
    chunked_loss: bool = Field(
        True, description="Compute the loss a chunk of tokens at a time without keeping the logits (tokens x "
                          "vocabulary floats): the same loss and gradients, and the largest tensor of a step "
                          "on small models is gone. Applies to models with a separate lm_head.",
    )
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel. auto: flash_attention_2 on CUDA when the flash-attn package is "
                            "installed and training runs in bf16/fp16, else PyTorch SDPA.",
    )
    auto_micro_batch: bool = Field(
        True, description="Pick the micro-batch for the hardware; the effective batch (batch_size x "
                          "gradient_accumulation_steps), and so what the optimizer sees, is unchanged. CUDA: the "
                          "largest divisor of it that fits in GPU memory at the longest examples, accumulation "
                          "making up the rest. CPU: the whole effective batch, packed and run as rows of at most "
                          "row_tokens tokens (whole examples). Needs packing (not false) to apply.",
    )
    row_tokens: int | None = Field(
        None, ge=8, le=131_072, description="CPU rows (see auto_micro_batch): the most tokens one forward pass "
                                            "runs; an example longer than that gets a row of its own. null: 2048. "
                                            "Longer rows pay the per-pass costs of 30 layers once for more "
                                            "examples: on SmolLM2-135M, rows of 1,500 tokens ran at 1.4x the "
                                            "tokens/s of rows of 300; activation memory grows with the row.",
    )
    row_length_multiple: int | None = Field(
        128, ge=1, le=4096, description="CPU rows (see auto_micro_batch): pad each packed row to a multiple of this "
                                        "many tokens with a segment that nothing attends to and the loss skips. "
                                        "The CPU's bf16 kernels keep memory for every input shape they meet; rows of "
                                        "a few lengths ran at 0.88x the peak memory and the same tokens/s on a 30M "
                                        "model. null: rows as cut. GPU micro-batches are not padded.",
    )
    validation_split: float | None = Field(
        None, gt=0.0, le=0.5, description="Hold out this fraction of the training file's records (rounded up) as "
                                          "the validation set, drawn by the job's seed; the job's events and usage "
                                          "say how many. null: no split. Not with a validation_file.",
    )
    eval_every_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Compute the validation loss every this many optimizer steps and at "
                                               "the last step; null: at each epoch end. Needs a validation set.",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, le=10_000, description="Stop training after this many evaluations in a row that do not lower "
                                           "the best validation loss by at least early_stopping_min_delta; a normal "
                                           "end of training. null: train the whole schedule. Needs a validation set.",
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0.0, description="The least decrease of the best validation loss that counts as an improvement "
                                 "for early_stopping_patience.",
    )
    select_best: Literal["auto", "last", "valid_loss"] = Field(
        "auto", description="Which weights the job delivers as its adapter. valid_loss: those of the evaluation "
                            "with the lowest validation loss; last: those of the last step. auto: valid_loss when "
                            "there is a validation set, else last.",
    )
    dataloader_workers: int = Field(
        0, ge=0, le=32, description="Processes preparing batches. Data is tokenized up front, so 0 (batches "
                                    "built in the training process) is fastest where cores are few: 1 worker ran "
                                    "at 0.8x the tokens/s of 0 on a 2-core CPU.",
    )
    processes: int = Field(
        1, ge=1, le=MAX_PROCESSES,
        description="Training processes for this job (torch.distributed data parallel on one machine): on CUDA "
                    "one per GPU (NCCL), refused when the worker has fewer GPUs; on CPU that many CPU processes "
                    "(gloo), the cores shared among them. The effective batch (batch_size x "
                    "gradient_accumulation_steps) stays the optimizer's batch: each process takes 1/processes "
                    "of every step's examples, so it must divide the effective batch. Not for DPO jobs.",
    )


def processes_conflict(training: TrainingSettings, *, dpo: bool) -> tuple[str, str] | None:
    """(message, param) when training.processes cannot split this job's steps, else None.

    Each process takes the same share of every optimizer step, so the effective batch must divide
    evenly; DPO jobs train in one process. Checked at job creation (400) and at the recipe's setup.
    """
    t = training
    if t.processes == 1:
        return None
    if dpo:
        return ("training.processes above 1 is not supported for DPO jobs; omit it (or set 1).", "training.processes")
    effective = t.batch_size * t.gradient_accumulation_steps
    if effective % t.processes:
        return (f"training.processes ({t.processes}) must divide the effective batch (batch_size {t.batch_size} x "
                f"gradient_accumulation_steps {t.gradient_accumulation_steps} = {effective}): each process takes "
                f"the same share of every step. Use an effective batch that is a multiple of {t.processes}, or "
                "another process count.", "training.processes")
    return None


def validation_conflict(training: TrainingSettings, *, has_validation_file: bool) -> tuple[str, str] | None:
    """(message, param) when the training settings contradict the job's validation set, else None.

    Checked where both are known: at job creation (an answer of 400) and when the recipe is set up.
    """
    t = training
    if t.validation_split is not None and has_validation_file:
        return ("Give either validation_file or training.validation_split, not both: the split holds out part of "
                "the training file as the validation set.", "training.validation_split")
    if has_validation_file or t.validation_split is not None:
        return None
    needs = {"training.eval_every_steps": t.eval_every_steps is not None,
             "training.early_stopping_patience": t.early_stopping_patience is not None,
             "training.select_best": t.select_best == "valid_loss"}
    for param, asked in needs.items():
        if asked:
            return (f"{param} needs a validation set: give a validation_file, or hold out part of the training file "
                    f"with training.validation_split (e.g. 0.1).", param)
    return None


class IterateTarget(_Frozen):
    metric: str = Field("pass@1", pattern=r"^pass@[1-9][0-9]*$", description="pass@k, k among the evaluation's k.")
    min: float = Field(ge=0.0, le=1.0, description="Stop once the tuned model reaches this.")


class AutoIterateSpec(_Frozen):
    """Train, evaluate, and while the target is missed adjust and train again (see jobs.iteration)."""

    target: IterateTarget
    max_rounds: int = Field(3, ge=1, le=10)


# beta when a DPO job gives "auto": TRL's default, the value of the DPO paper's experiments.
DPO_DEFAULT_BETA = 0.1


class DpoSpec(_Frozen):
    """Direct Preference Optimization (method.type "dpo"): the loss of Rafailov et al. 2023 on preference
    records, against the reference the job starts from (see TrainingSpec.init_adapter)."""

    beta: float = Field(DPO_DEFAULT_BETA, gt=0.0, le=10.0,
                        description="How far the tuned model may move from the reference: the DPO loss is "
                                    "-log sigmoid(beta x (the preferred answer's log-ratio - the other's)). Higher "
                                    "keeps it closer.")


class InitAdapter(_Frozen):
    """The fine-tuned model a job starts from instead of a fresh LoRA adapter (OpenAI's `model` naming an
    ft: model): its adapter is loaded trainable, with its own LoRA configuration, on its base."""

    id: str = Field(description="The adapter (ftadapter-...).")
    model: str = Field(description="The ft: model name the job was created with, as the job reports it.")


# Characters W&B refuses in a project name.
_WANDB_PROJECT = re.compile(r"^[^/\\#?%:\x00-\x1f]{1,128}$")


class WandbIntegration(_Frozen):
    """OpenAI's wandb settings: where the job's run is logged (see README, "Experiment trackers")."""

    project: str = Field(description="The W&B project the run is created under.")
    name: str | None = Field(None, min_length=1, max_length=128, description="The run's display name; null: the "
                                                                             "job's id.")
    entity: str | None = Field(None, min_length=1, max_length=128, description="The W&B team or user; null: the "
                                                                               "API key's default entity.")
    tags: tuple[str, ...] = Field((), max_length=64, description="Tags added to the run beside Tuneforge's own "
                                                                 "(tuneforge/finetune, tuneforge/<model>, "
                                                                 "tuneforge/<job id>).")

    @field_validator("project")
    @classmethod
    def _project(cls, v: str) -> str:
        if not _WANDB_PROJECT.match(v):
            raise ValueError("project must be 1-128 characters without '/', '\\', '#', '?', '%', ':' or control "
                             "characters (W&B's rule for project names)")
        return v

    @field_validator("tags", mode="before")
    @classmethod
    def _no_tags(cls, v: object) -> object:
        return () if v is None else v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for tag in v:
            if not 1 <= len(tag) <= 64:
                raise ValueError(f"tag {tag[:70]!r}: W&B tags are 1-64 characters")
        return v


class Integration(_Frozen):
    """One of a job's integrations: OpenAI's wandb, or Tuneforge's tensorboard (the job's TensorBoard
    event files as a result file, tensorboard.tar.gz)."""

    type: Literal["wandb", "tensorboard"] = Field(description="wandb: log the run to Weights & Biases; "
                                                              "tensorboard: attach TensorBoard event files to the "
                                                              "job's result_files.")
    wandb: WandbIntegration | None = None

    @model_validator(mode="after")
    def _settings_match_type(self) -> Integration:
        if self.type == "wandb" and self.wandb is None:
            raise ValueError('type "wandb" needs its settings: {"type": "wandb", "wandb": {"project": "..."}}')
        if self.type != "wandb" and self.wandb is not None:
            raise ValueError(f"wandb settings are given but type is {self.type!r}; omit wandb")
        return self


Device = Literal["any", "cpu", "cuda"]
DEVICE_DESCRIPTION = (
    "The kind of device the job trains on. any: the training queue, which every training worker consumes; "
    "cpu or cuda: the queue <training queue>.<device>, which only workers with that device consume (a "
    "worker with CUDA consumes .cuda, one without consumes .cpu), so the job waits queued until one takes it.")


class TrainingSpec(_Frozen):
    lora: LoraSpec = LoraSpec()
    quantization: QuantizationSpec = QuantizationSpec()
    training: TrainingSettings = TrainingSettings()
    evaluation: JobEvalSpec | None = Field(None, description="Evaluate base and tuned model after training.")
    auto_iterate: AutoIterateSpec | None = None
    seed: int = 42
    dpo: DpoSpec | None = Field(None, description="Set: the job trains with DPO on preference records; null: "
                                                  "supervised fine-tuning.")
    init_adapter: InitAdapter | None = Field(None, description="Start from this fine-tuned model's adapter (for "
                                                               "DPO also the reference); null: a fresh adapter.")
    integrations: tuple[Integration, ...] = Field((), description="Experiment trackers the job logs to.")
    device: Device = Field("any", description=DEVICE_DESCRIPTION)

    @property
    def method(self) -> str:
        """OpenAI's method.type: "dpo" or "supervised"."""
        return "dpo" if self.dpo is not None else "supervised"
