"""The sections every stage shares: model (and LoRA), optimizer, training loop, checkpoints, logging, a text
source, prompt format, and the collapse limits PPO's guard and `rlhf eval` both judge by."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rlhf.config.errors import ConfigError


@dataclass
class RunSettings:
    """What every training stage's run has: where it lives, its seed and how it resumes (each stage sets its own
    default output_dir)."""

    output_dir: str = "runs/run"
    """Where checkpoints, final/, metrics.jsonl and config.yaml go."""
    seed: int = 0
    """Seed for python, numpy and torch."""
    resume: str = "auto"
    """auto = newest complete checkpoint in output_dir; never; or a checkpoint path."""
    resume_changes: Literal["refuse", "allow"] = "refuse"
    """A resume whose checkpoint was made with other values of keys that change the result (model, data, seed,
    batch sizes, the algorithm's settings): refuse, naming each key, or allow and continue with the new values.
    Keys that change no result (logging, evaluation and checkpoint cadence, the run's length) are always taken."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train low-rank adapters (peft) instead of all weights."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Adapter dropout; 0 keeps PPO's first ratio at exactly 1."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that get adapters."""
    merge_on_save: bool = True
    """Write `final/` as merged full weights (True) or as a peft adapter (False)."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Hugging Face model dir or hub name (the previous stage's `final/`)."""
    tokenizer: str = ""
    """Tokenizer dir or hub name; empty = same as name_or_path."""
    from_config: bool = False
    """Build fresh random weights from name_or_path's config.json (pretraining from scratch)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in; keep float32 masters and use mixed_precision for speed."""
    trust_remote_code: bool = False
    """Allow model code from the hub; off unless you trust the repo."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    attn_implementation: str = "auto"
    """Attention kernel: auto (transformers' choice, sdpa where supported; on CPU, sdpa in fp32 for short bf16/fp16
    sequences, where it is faster) or a name transformers knows: sdpa, eager, flash_attention_2, flex_attention."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas (InstructGPT: 0.9, 0.95)."""
    eps: float = 1e-8
    """Adam epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """LR decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    warmup_start_ratio: float = 0.0
    """Warm-up starts at this fraction of the peak LR (InstructGPT PPO: 0.1)."""
    min_lr_ratio: float = 0.0
    """Cosine/linear decay ends at this fraction of the peak LR (InstructGPT RM: 0.1)."""


@dataclass
class TrainConfig:
    max_steps: int = 0
    """Optimizer steps (PPO: iterations); 0 = derive from epochs."""
    epochs: float = 1.0
    """Passes over the training data when max_steps is 0."""
    batch_size: int = 32
    """Global examples per optimizer step (RM: prompts), across processes and accumulation."""
    micro_batch_size: int = 8
    """Examples per forward pass per process; accumulation = batch_size / (micro_batch_size * processes)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto = bf16 autocast on a GPU that supports it or a CPU with bf16 matrix instructions, else fp32."""
    eval_every: int = 100
    """Evaluate on held-out data every N steps (0 = only at the end)."""
    eval_max_batches: int = 0
    """Cap on held-out micro-batches per evaluation (0 = all)."""
    cpu: bool = False
    """Force CPU even when a GPU is present."""
    compile: bool = False
    """torch.compile the training forward + backward (TorchInductor): a one-off compile per model (again when
    input shapes first change), then fused kernels; for long runs. Generation and scoring stay eager. Costs and
    gains: docs/benchmarks.md."""
    max_nonfinite_skips: int = 0
    """Steps with a NaN/inf loss, gradient norm (PPO: also reward, advantage) skipped before the run stops."""
    concurrent_models: Literal["auto", "on", "off"] = "auto"
    """PPO on a CPU, one process: the policy's and the critic's forward, backward and optimizer step of each
    minibatch (and the rollout's scoring forwards: policy and reference | critic and reward models) run in two
    threads, the CPU's threads split between them: the same computation, sooner, for one more model's activations
    in memory at a time (docs/benchmarks.md). auto = on with 2+ CPU threads; several
    processes, GPUs and models with dropout or gradient checkpointing run them in sequence."""


@dataclass
class CheckpointConfig:
    every: int = 500
    """Save a resumable checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Keep this many newest checkpoints (0 = keep all)."""


@dataclass
class LoggingConfig:
    every: int = 10
    """Write a metrics.jsonl row every N steps."""
    tensorboard: bool = True
    """Also write TensorBoard events next to metrics.jsonl when tensorboard is installed."""
    report_to: list[str] = field(default_factory=list)
    """More trackers, through accelerate: any of tensorboard, wandb, trackio, mlflow (install them with
    `pip install 'rlhf[track]'`); each gets the resolved config and every metric. Offline they write locally:
    wandb with WANDB_MODE=offline under the output dir, trackio into its local store (TRACKIO_DIR, `trackio show`),
    mlflow into MLFLOW_TRACKING_URI or MLflow's default ./mlflow.db (`mlflow ui`), artifacts in <output_dir>/mlruns."""
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    """Console progress: a bar on a terminal, periodic lines otherwise."""
    num_samples: int = 3
    """Sampled completions written as text at each evaluation."""


@dataclass
class TextSource:
    path: str = ""
    """File (json/jsonl/parquet), saved datasets dir or hub dataset name."""
    split: str = "train"
    """Split for hub datasets and saved DatasetDicts."""
    subset: str = ""
    """A hub dataset's config name (e.g. `main` for openai/gsm8k); empty = its default."""
    field_map: dict[str, str] = field(default_factory=dict)
    """Canonical field -> field name in the source, e.g. {prompt: question}."""
    max_rows: int = 0
    """Read at most this many rows (0 = all)."""


@dataclass
class FormatConfig:
    prompt_template: str = "Human: {prompt} Assistant:"
    """Plain prompt format when no chat template is used; the completion follows after one space."""
    use_chat_template: Literal["auto", "always", "never"] = "auto"
    """Render with the tokenizer's chat template (auto = when the tokenizer has one)."""
    max_length: int = 512
    """Max tokens of prompt + completion."""
    max_prompt_length: int = 256
    """Prompts longer than this are cut from the left (keeping the end of the prompt)."""
    truncation: Literal["truncate", "drop", "error"] = "truncate"
    """Too-long rows: cut the completion at max_length, drop and count them, or stop with an error."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed data row stops the run (naming file and row) or is skipped and counted."""


@dataclass
class CollapseLimits:
    """When a policy counts as collapsed (rlhf.algorithms.collapse): each sign against the SFT policy's. A ratio
    or KL limit of 0 turns its check off; max_repeat_share 1 does."""

    max_repeat_share: float = 0.1
    """Flag when the share of responses repeating an n-gram `repeat_times` times in a row exceeds SFT's by more."""
    repeat_times: int = 3
    """Repeats in a row that count ("today today today" = 3)."""
    max_ngram: int = 4
    """Longest repeated unit checked, in tokens (a word of several tokens, a short phrase)."""
    min_distinct2_ratio: float = 0.4
    """Flag when distinct-2 falls below this fraction of SFT's."""
    min_length_ratio: float = 0.5
    """Flag when the mean response length falls below this fraction of SFT's."""
    max_length_ratio: float = 2.0
    """Flag when the mean response length exceeds this multiple of SFT's."""
    min_eos_share_ratio: float = 0.5
    """Flag when the share of responses that end (EOS) falls below this fraction of SFT's."""
    max_kl: float = 0.0
    """eval: flag a checkpoint whose KL to SFT exceeds this (0 = the run's kl.budget, else max_kl_over_target x
    its kl.target when it was adaptive, else no KL check)."""
    max_kl_over_target: float = 1.5
    """eval: with no max_kl and no budget, flag KL above this multiple of the run's KL target."""

    def validate(self, prefix: str) -> None:
        for key in ("min_distinct2_ratio", "min_length_ratio", "max_length_ratio", "min_eos_share_ratio", "max_kl"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key} must be >= 0 (0 = off), got {getattr(self, key)}")
        if not 0 <= self.max_repeat_share <= 1 or self.max_kl_over_target < 0:
            raise ConfigError(
                f"need 0 <= {prefix}.max_repeat_share <= 1 (1 = off) and {prefix}.max_kl_over_target >= 0, got "
                f"{self.max_repeat_share} and {self.max_kl_over_target}"
            )
        if self.repeat_times < 2 or self.max_ngram < 1:
            raise ConfigError(
                f"need {prefix}.repeat_times >= 2 and {prefix}.max_ngram >= 1, got {self.repeat_times} and "
                f"{self.max_ngram}"
            )
        if self.max_length_ratio and self.max_length_ratio < self.min_length_ratio:
            raise ConfigError(f"{prefix}.max_length_ratio must be >= {prefix}.min_length_ratio")


def source_paths(section: Any, names: tuple[str, ...], prefix: str = "data") -> dict[str, str]:
    """{"<prefix>.<name>.path": path} for each named TextSource of `section` that has a path."""
    return {f"{prefix}.{n}.path": getattr(section, n).path for n in names if getattr(section, n).path}


def model_paths(model: ModelConfig, prefix: str) -> dict[str, str]:
    """The model dir (and a separate tokenizer, if set) a ModelConfig names, keyed by their dotted config keys."""
    out = {f"{prefix}.name_or_path": model.name_or_path}
    if model.tokenizer:
        out[f"{prefix}.tokenizer"] = model.tokenizer
    return out
