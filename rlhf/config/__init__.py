"""Typed configs: one dataclass per stage, nested by concern, loaded from YAML with `--set` overrides.

Precedence is strict: dataclass defaults -> YAML file -> `--set a.b=c` overrides. Unknown keys (with a
did-you-mean), wrong types and impossible values raise `ConfigError` naming the key and the file before
any model is loaded. Every field carries a one-line docstring (the string literal under it); defaults
follow InstructGPT (arXiv 2203.02155) and the N+ implementation details of RLHF with PPO.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key is unknown, mistyped or impossible; the message names the key and the file."""


# --------------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------------


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
    """torch.compile the training forward + backward (TorchInductor): a one-off compile per model (tens of
    seconds, again when input shapes first change), then fused kernels. For long runs; generation and scoring stay
    eager. Measured in docs/benchmarks.md."""
    max_nonfinite_skips: int = 0
    """Steps with a NaN/inf loss, gradient norm (PPO: also reward, advantage) skipped before the run stops."""
    concurrent_models: Literal["auto", "on", "off"] = "auto"
    """PPO on a CPU, one process: the policy's and the critic's forward, backward and optimizer step of each
    minibatch (and the rollout's scoring forwards: policy and reference | critic and reward models) run in two
    threads, the CPU's threads split between them: the same computation, the train phase 8-17% sooner here, for one
    more model's activations in memory at a time (docs/benchmarks.md). auto = on with 2+ CPU threads; several
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


# --------------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------------


@dataclass
class SFTData:
    kind: Literal["sft", "text"] = "sft"
    """sft = prompt/completion or chat rows; text = plain pretraining text (no prompt mask)."""
    train: TextSource = field(default_factory=TextSource)
    """Training rows."""
    eval: TextSource = field(default_factory=TextSource)
    """Held-out rows for eval loss / perplexity (empty path = no eval)."""
    mask_prompt: bool = True
    """Loss on completion tokens only (False puts the prompt tokens back in)."""
    train_on: Literal["all_assistant_turns", "last_turn"] = "all_assistant_turns"
    """Chat rows rendered with a chat template: learn every assistant turn of the conversation (each up to and
    including its turn-end token; other roles masked), or only the last; a template that cannot be split falls
    back to the last turn with a notice. Prompt/completion rows always learn their completion."""
    packing: bool = False
    """Pack each micro-batch's rows into sequences of up to format.max_length tokens (best-fit decreasing, no
    attention across rows, the same token-mean loss); batches then mix lengths instead of grouping them."""
    pretrain_mix: TextSource = field(default_factory=TextSource)
    """Pretraining text mixed into SFT batches (empty path = none)."""
    pretrain_mix_ratio: float = 0.0
    """Share of each batch drawn from pretrain_mix (InstructGPT's RL init: 0.1)."""
    format: FormatConfig = field(default_factory=FormatConfig)
    """Prompt rendering and truncation."""


@dataclass
class SFTConfig:
    output_dir: str = "runs/sft"
    """Where checkpoints, final/, metrics.jsonl and config.yaml go."""
    seed: int = 0
    """Seed for python, numpy and torch."""
    resume: str = "auto"
    """auto = newest complete checkpoint in output_dir; never; or a checkpoint path."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTData = field(default_factory=SFTData)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        _check_common(self)
        _positive(self.data.format.max_length, "data.format.max_length")
        if not 0.0 <= self.data.pretrain_mix_ratio < 1.0:
            raise ConfigError(f"data.pretrain_mix_ratio must be in [0, 1), got {self.data.pretrain_mix_ratio}")
        if self.data.pretrain_mix_ratio > 0 and not self.data.pretrain_mix.path:
            raise ConfigError("data.pretrain_mix_ratio > 0 needs data.pretrain_mix.path")
        if self.data.kind == "text" and self.data.pretrain_mix.path:
            raise ConfigError("data.pretrain_mix makes no sense when data.kind is text; remove it")

    def paths(self) -> dict[str, str]:
        return _source_paths(self.data, ("train", "eval", "pretrain_mix")) | _model_paths(self.model, "model")


@dataclass
class RMLoss:
    margin_coef: float = 0.0
    """Subtract margin_coef * (rank distance) inside the sigmoid (Llama-2 style margin); 0 = off."""
    center_coef: float = 0.0
    """Reward-centering regulariser coef * mean(r^2) (Eisenstein et al.); 0 = off."""


@dataclass
class RMData:
    train: TextSource = field(default_factory=TextSource)
    """Preference rows: chosen/rejected pairs or K-way `ranked` lists."""
    eval: TextSource = field(default_factory=TextSource)
    """Held-out preference rows for accuracy (empty path = none)."""
    reference: TextSource = field(default_factory=TextSource)
    """Reference completions (SFT demonstrations) whose mean score is shifted to 0; empty = no normalisation."""
    reference_max_rows: int = 1000
    """Use at most this many reference rows for the normalisation."""
    format: FormatConfig = field(default_factory=FormatConfig)
    """Prompt rendering and truncation (must match the PPO stage)."""
    packing: bool = False
    """Pack each micro-batch's responses into sequences of up to format.max_length tokens (best fit, no attention
    across responses, each score read at its response's last token): no padding to a list's longest response."""


@dataclass
class RMEnsemble:
    size: int = 1
    """Reward models to train (1 = one RM in final/; N > 1 = members member-<i>/, final/ lists them)."""
    holdout: int = 0
    """The last `holdout` members are kept out of the PPO reward: a held-out proxy for `rlhf eval`."""
    bootstrap: bool = False
    """Each member trains on a bootstrap resample of the comparisons (else all of them; seeds always differ)."""


@dataclass
class RMConfig:
    output_dir: str = "runs/rm"
    """Where checkpoints, final/, metrics.jsonl and config.yaml go."""
    seed: int = 0
    """Seed for python, numpy and torch."""
    resume: str = "auto"
    """auto = newest complete checkpoint in output_dir; never; or a checkpoint path."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: RMData = field(default_factory=RMData)
    loss: RMLoss = field(default_factory=RMLoss)
    ensemble: RMEnsemble = field(default_factory=RMEnsemble)
    """Several reward models (different seeds / bootstrap resamples) for conservative PPO rewards."""
    share_prompt: bool = False
    """Run each prompt once per training micro-batch, its K responses on the prompt's KV cache (forward and
    backward): the same scores and gradients up to float rounding, with (K-1)/K of the prompt tokens' work gone.
    Pays where prompts are long against responses (multi-turn dialogues), within noise on short ones
    (docs/benchmarks.md). Not with data.packing, gradient checkpointing or train.compile; skipped under
    FSDP / ZeRO-3. Evaluation runs whole sequences."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=64, micro_batch_size=4))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=9e-6, min_lr_ratio=0.1))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        _check_common(self)
        if self.loss.margin_coef < 0 or self.loss.center_coef < 0:
            raise ConfigError("loss.margin_coef and loss.center_coef must be >= 0")
        e = self.ensemble
        _positive(e.size, "ensemble.size")
        if not 0 <= e.holdout < e.size:
            raise ConfigError(
                f"ensemble.holdout must be in [0, ensemble.size) so PPO keeps at least one member, got {e.holdout}"
            )
        _check_share_prompt(self)

    def paths(self) -> dict[str, str]:
        return _source_paths(self.data, ("train", "eval", "reference")) | _model_paths(self.model, "model")


@dataclass
class RolloutConfig:
    max_new_tokens: int = 64
    """Longest response sampled."""
    temperature: float = 1.0
    """Sampling temperature; it also divides the logits in every log-prob forward."""
    top_k: int = 0
    """0 = sample from the full distribution (PPO's log-probs assume it)."""
    top_p: float = 1.0
    """1.0 = sample from the full distribution."""
    generation_batch_size: int = 64
    """Prompts per generate() call per process."""
    missing_eos_penalty: float | None = -1.0
    """Score given to a response that hit max_new_tokens without EOS (null = keep the RM score)."""
    samples_per_prompt: int = 1
    """k responses per prompt per iteration (train.batch_size counts responses); rloo/grpo need k >= 2."""
    share_prompt: bool = True
    """With k > 1: generation prefills a group's prompt once for its k samples, and the scoring forwards (old and
    reference log-probs, values, reward models) run it once and its k responses on its KV cache: the same numbers
    up to float rounding (PPO's first log-ratio within 2e-6 of 0 in fp32, measured), without (k-1)/k of the prompt
    tokens' work. Off under FSDP/ZeRO-3; the scoring half also for a reward model with its own tokenizer."""


@dataclass
class KLConfig:
    kl_coef: float = 0.02
    """beta: per-token KL penalty to the SFT reference (InstructGPT: 0.02); the starting beta when adaptive."""
    adaptive: bool = False
    """Adapt beta so the KL per sequence holds at `target` (see `controller`)."""
    controller: Literal["antiwindup", "pi", "proportional"] = "antiwindup"
    """antiwindup = PI control of log(beta) without integral windup (holds the target when the policy is slow to
    move, then takes off); pi = the same without the anti-windup (issue 9); proportional = Ziegler et al. 2019."""
    target: float = 6.0
    """Target KL (nats per sequence) of the adaptive controller."""
    p_gain: float = 1.0
    """pi, antiwindup: proportional gain on the relative KL error (log-beta per unit error)."""
    i_gain: float = 0.2
    """pi, antiwindup: integral gain (log-beta per iteration per unit error)."""
    lookahead: float = 10.0
    """pi, antiwindup: act on the KL predicted this many iterations ahead from its trend (0 = the current KL)."""
    smoothing: float = 0.3
    """pi, antiwindup: weight of the newest batch in the smoothed KL the controller acts on (1 = no smoothing)."""
    min_coef: float = 1.0e-4
    """pi, antiwindup: beta never goes below this."""
    max_coef: float = 10.0
    """pi, antiwindup: beta never goes above this."""
    min_share: float = 0.1
    """antiwindup: lower beta at full rate only while the KL penalty's share of the return's spread,
    beta * std(KL_i) / std(score_i) (1 at the KL-regularised optimum), is at least this; below, in proportion."""
    max_error: float = 2.0
    """antiwindup: the relative KL error is clipped to [-1, max_error]: a KL predicted at 3x the target raises
    beta 2x as fast as one at 2x."""
    max_step: float = 1.0
    """antiwindup: log(beta) moves by at most this per iteration, either way (one noisy batch cannot multiply beta
    by more than e = 2.7, and whatever one iteration does, one iteration can undo)."""
    horizon: int = 10000
    """proportional: controller horizon in episodes."""
    budget: float = 0.0
    """Hard KL budget: stop, checkpoint and write final/ once the smoothed KL per sequence passes it (0 = off)."""
    budget_window: int = 5
    """Iterations averaged for the budget's smoothed KL."""
    estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator in the reward (k1 = log-ratio; k3 = low-variance, non-negative)."""
    placement: Literal["reward", "loss"] = "reward"
    """reward = -beta * KL per token in the reward (InstructGPT); loss = beta * k3 KL as a loss term (GRPO)."""


@dataclass
class CollapseLimits:
    """When a policy counts as collapsed (rlhf.algorithms.collapse): each sign against the SFT policy's. A ratio or KL limit of
    0 turns its check off; max_repeat_share 1 does."""

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


@dataclass
class CollapseGuard(CollapseLimits):
    stop: bool = False
    """Stop the run (checkpoint and final/, like kl.budget) once the rollouts' collapse signs, averaged over
    `window` iterations, cross the limits against the first iteration's (the SFT policy's own samples)."""
    window: int = 5
    """Iterations averaged before the guard judges."""


@dataclass
class RewardShaping:
    aggregate: Literal["mean", "mean_minus_std", "min"] = "mean"
    """Reward-model ensemble (models.reward is an ensemble dir): how members' scores combine (Coste et al. 2023)."""
    std_coef: float = 1.0
    """lambda of aggregate mean_minus_std: reward = mean - lambda * std over members."""
    clip: float = 0.0
    """Clip RM scores to [-clip, clip] (0 = off)."""
    normalize: bool = False
    """Normalise scores by a running mean/std."""
    whiten_rewards: bool = False
    """Whiten per-token rewards over the batch before GAE."""
    function: str = ""
    """A reward computed by code, `module:function(prompt, response) -> float` (the eval judge's contract)."""
    function_weight: float = 1.0
    """Weight of `function` in the score (with a reward model too: model_weight * RM + function_weight * fn)."""
    model_weight: float = 1.0
    """Weight of the reward model's score when `function` is also set."""


@dataclass
class PPOHyper:
    ppo_epochs: int = 4
    """Passes over each rollout batch (N+: 4; InstructGPT: 1). With 1 and mini_batch_size = train.batch_size (one
    optimizer step per rollout: GRPO's usual setting) and the KL out of the reward, the old log-probs are the
    update's own forward, without a scoring forward of their own."""
    mini_batch_size: int = 64
    """Episodes per optimizer step (global)."""
    micro_batch_size: int = 8
    """Episodes per forward per process (gradient accumulation inside a minibatch)."""
    advantage: Literal["gae", "reinforce", "rloo", "grpo"] = "gae"
    """gae = GAE with the value model; reinforce = returns minus `baseline`; rloo / grpo = critic-free, from the
    rollout.samples_per_prompt responses to each prompt (leave-one-out mean; group-normalised)."""
    baseline: Literal["value", "mean"] = "value"
    """reinforce: a learned value model, or the batch mean of the returns (critic-free)."""
    objective: Literal["clip", "klpen"] = "clip"
    """clip = L^CLIP (PPO's clipped surrogate); klpen = L^KLPEN, the KL-penalised surrogate with adaptive beta."""
    klpen_coef: float = 1.0
    """klpen: the starting beta of the KL(pi_old || pi) penalty (PPO paper sec. 4: the start hardly matters)."""
    klpen_target: float = 0.01
    """klpen: d_targ, the per-token KL(pi_old || pi) each update aims at (PPO paper: 0.01 was best of 0.003-0.03)."""
    cliprange: float = 0.2
    """epsilon of the clipped surrogate."""
    cliprange_value: float = 0.2
    """Value clip range (0 = unclipped value loss)."""
    vf_coef: float = 0.1
    """c1, the value loss coefficient."""
    ent_coef: float = 0.0
    """c2, the entropy bonus coefficient."""
    gamma: float = 1.0
    """GAE discount (InstructGPT: no discount)."""
    lam: float = 0.95
    """GAE lambda."""
    target_approx_kl: float = 0.0
    """Stop this iteration's epochs once a minibatch's approx-KL exceeds this (0 = never)."""
    group_minibatches: bool = False
    """With k > 1 samples per prompt: shuffle whole groups (a prompt's k episodes) into minibatches instead of
    single episodes, and keep a group's episodes in one micro-batch, so the update's policy and value forwards run
    each prompt once (with rollout.share_prompt; not under FSDP/ZeRO-3, train.compile or gradient checkpointing,
    whose layers drop the KV cache). Pays with prompts of tens of tokens and more (forward + backward 1.3x at k = 4
    with 32-token prompts, 2.3-2.8x with 128-256); on tiny models with short prompts the second forward costs more
    than it saves (docs/benchmarks.md). Off: episodes shuffled singly, as TRL and OpenRLHF do.
    mini_batch_size must be a multiple of k."""


@dataclass
class PtxConfig:
    ptx_coef: float = 0.0
    """gamma_ptx: weight of the pretraining LM loss gradients (0 = plain PPO; InstructGPT: 27.8)."""
    data: TextSource = field(default_factory=TextSource)
    """Pretraining text for the ptx term."""
    kind: Literal["text", "sft"] = "text"
    """text = {text} rows; sft = demonstrations (prompt/completion or chat), rendered whole as LM text."""
    sequences_per_episode: float = 1.0
    """Pretraining sequences per RL episode in each minibatch (InstructGPT: 8)."""
    max_length: int = 256
    """Max tokens per pretraining sequence."""


@dataclass
class PPOData:
    prompts: TextSource = field(default_factory=TextSource)
    """Training prompts."""
    eval_prompts: TextSource = field(default_factory=TextSource)
    """Held-out prompts sampled at each evaluation (empty = none)."""
    format: FormatConfig = field(default_factory=FormatConfig)
    """Prompt rendering (must match the RM stage)."""


@dataclass
class PPOModels:
    policy: ModelConfig = field(default_factory=ModelConfig)
    """The policy, initialised from SFT; the frozen reference is the same weights."""
    reward: ModelConfig = field(default_factory=ModelConfig)
    """The frozen reward model (rm/final)."""
    value_init: Literal["reward", "policy"] = "reward"
    """reward = separate value network from the RM (InstructGPT); policy = from the policy weights."""
    reference: Literal["copy", "disable_adapter", "none"] = "copy"
    """copy = a second frozen copy of SFT; disable_adapter = the LoRA policy with its adapter off; none = no
    reference at all (kl.kl_coef 0 and no kl.budget: the runs of Dr. GRPO and DAPO, TRL's GRPO with beta 0), which
    saves its memory and its scoring forward and logs no KL to it (`rlhf eval` still measures the KL to SFT)."""


@dataclass
class EMAConfig:
    decay: float = 0.0
    """EMA of the policy weights used for eval and the final save (InstructGPT: 0.992; 0 = off)."""


@dataclass
class PPOConfig:
    output_dir: str = "runs/ppo"
    """Where checkpoints, final/, metrics.jsonl and config.yaml go."""
    seed: int = 0
    """Seed for python, numpy and torch."""
    resume: str = "auto"
    """auto = newest complete checkpoint in output_dir; never; or a checkpoint path."""
    models: PPOModels = field(default_factory=PPOModels)
    data: PPOData = field(default_factory=PPOData)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    collapse: CollapseGuard = field(default_factory=CollapseGuard)
    """Collapse signs of the rollouts (rlhf.algorithms.collapse) and the optional guard that stops a collapsing run."""
    reward: RewardShaping = field(default_factory=RewardShaping)
    ppo: PPOHyper = field(default_factory=PPOHyper)
    ptx: PtxConfig = field(default_factory=PtxConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=512, micro_batch_size=8))
    """max_steps = PPO iterations; batch_size = episodes (prompts) per iteration."""
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=1e-6, eps=1e-5, scheduler="constant", warmup_steps=10, warmup_start_ratio=0.1
        )
    )
    """Policy optimizer (InstructGPT: constant LR, 10-iteration warm-up from 1/10 of peak, Adam eps 1e-5)."""
    value_lr: float = 0.0
    """Learning rate of the value model (0 = same as optim.lr)."""
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=20))
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(every=1))

    def validate(self) -> None:
        _check_common(self)
        p = self.ppo
        if p.mini_batch_size > self.train.batch_size:
            raise ConfigError(
                f"ppo.mini_batch_size ({p.mini_batch_size}) is larger than train.batch_size ({self.train.batch_size})"
            )
        if self.train.batch_size % p.mini_batch_size:
            raise ConfigError(
                f"train.batch_size ({self.train.batch_size}) must be a multiple of ppo.mini_batch_size "
                f"({p.mini_batch_size})"
            )
        if p.micro_batch_size > p.mini_batch_size:
            raise ConfigError("ppo.micro_batch_size must be <= ppo.mini_batch_size")
        _positive(p.ppo_epochs, "ppo.ppo_epochs")
        if not 0 < p.cliprange < 1:
            raise ConfigError(f"ppo.cliprange must be in (0, 1), got {p.cliprange}")
        if not (0 <= p.gamma <= 1 and 0 <= p.lam <= 1):
            raise ConfigError("ppo.gamma and ppo.lam must be in [0, 1]")
        _positive(self.rollout.temperature, "rollout.temperature")
        _positive(self.rollout.max_new_tokens, "rollout.max_new_tokens")
        k = self.kl
        if k.kl_coef < 0:
            raise ConfigError(f"kl.kl_coef must be >= 0, got {k.kl_coef}")
        if k.adaptive:
            _positive(k.target, "kl.target")
            _positive(k.kl_coef, "kl.kl_coef (the starting beta of an adaptive controller)")
            _positive(k.horizon, "kl.horizon")
            if not 0 < k.min_coef <= k.max_coef:
                raise ConfigError(f"need 0 < kl.min_coef <= kl.max_coef, got {k.min_coef} and {k.max_coef}")
            if not 0 < k.smoothing <= 1:
                raise ConfigError(f"kl.smoothing must be in (0, 1], got {k.smoothing}")
            if k.min_share <= 0 or k.max_error < 1 or k.max_step <= 0:
                raise ConfigError(
                    f"need kl.min_share > 0, kl.max_error >= 1 and kl.max_step > 0, got {k.min_share}, "
                    f"{k.max_error} and {k.max_step}"
                )
            if k.p_gain < 0 or k.i_gain <= 0 or k.lookahead < 0:
                raise ConfigError(
                    f"need kl.p_gain >= 0, kl.i_gain > 0 and kl.lookahead >= 0, got {k.p_gain}, {k.i_gain}, "
                    f"{k.lookahead}"
                )
        if k.budget < 0:
            raise ConfigError(f"kl.budget must be >= 0 (0 = off), got {k.budget}")
        self.collapse.validate("collapse")
        _positive(self.collapse.window, "collapse.window")
        _positive(k.budget_window, "kl.budget_window")
        if self.reward.std_coef < 0:
            raise ConfigError(f"reward.std_coef must be >= 0, got {self.reward.std_coef}")
        if self.ptx.ptx_coef < 0:
            raise ConfigError(f"ptx.ptx_coef must be >= 0, got {self.ptx.ptx_coef}")
        if self.ptx.ptx_coef > 0 and not self.ptx.data.path:
            raise ConfigError("ptx.ptx_coef > 0 needs ptx.data.path (pretraining text)")
        if not 0 <= self.ema.decay < 1:
            raise ConfigError(f"ema.decay must be in [0, 1), got {self.ema.decay}")
        if self.models.reference == "disable_adapter" and not self.models.policy.lora.enabled:
            raise ConfigError(
                "models.reference: disable_adapter needs models.policy.lora.enabled: true "
                "(without an adapter there is nothing to disable); use reference: copy"
            )
        if self.models.reference == "none" and (k.kl_coef != 0 or k.budget):
            raise ConfigError(
                f"models.reference: none leaves nothing to measure the KL against, but kl.kl_coef is {k.kl_coef} "
                f"and kl.budget {k.budget}: set both to 0 for a run without a KL term, or use reference: copy"
            )
        self._validate_lineage()

    def prompt_sharing(self, sharded: bool) -> tuple[bool, bool]:
        """(rollout, update): whether a group's prompt runs once (rollout.share_prompt, k > 1 samples per prompt) in
        the rollout's generation prefill and scoring forwards, and with ppo.group_minibatches in the update's too.
        Never through parameters sharded by FSDP/ZeRO-3 (`sharded`); not in the update under train.compile or
        gradient checkpointing (the checkpointed layers drop the KV cache)."""
        scoring = self.rollout.share_prompt and self.rollout.samples_per_prompt > 1 and not sharded
        checkpointed = self.models.policy.gradient_checkpointing
        return scoring, scoring and self.ppo.group_minibatches and not (self.train.compile or checkpointed)

    def scoring_micro_batch_size(self) -> int:
        """Episodes per forward of the rollout's scoring (per process): 4 x ppo.micro_batch_size, as no activations
        are kept for a backward."""
        return self.ppo.micro_batch_size * 4

    def old_logprobs_from_update(self) -> bool:
        """Whether the old log-probs can be the update's own forward instead of a scoring forward of their own: the
        update is one optimizer step (ppo_epochs 1, one minibatch of the whole batch), so every training forward
        runs the policy that sampled the rollout, and nothing before it reads them (the KL is not in the reward:
        kl.placement loss, or a fixed beta of 0). The PPO ratio is then exactly 1 (TRL's GRPO does the same with
        num_iterations 1); the KL statistics are read off that forward after the update."""
        one_step = self.ppo.ppo_epochs == 1 and self.ppo.mini_batch_size == self.train.batch_size
        kl_in_reward = self.kl.placement == "reward" and self.kl.kl_coef != 0  # (an adaptive beta starts > 0)
        return one_step and not kl_in_reward

    def uses_critic(self) -> bool:
        """Whether the advantage estimator needs a value model (GAE, REINFORCE with a learned baseline)."""
        from rlhf.algorithms import ADVANTAGE_NEEDS  # torch-free config module: the registry loads on use

        critic = ADVANTAGE_NEEDS[self.ppo.advantage].critic
        return self.ppo.baseline == "value" if critic is None else critic

    def _validate_lineage(self) -> None:
        p, k, r = self.ppo, self.rollout.samples_per_prompt, self.reward
        _positive(k, "rollout.samples_per_prompt")
        if self.train.batch_size % k:
            raise ConfigError(
                f"train.batch_size ({self.train.batch_size}) counts responses: it must be a multiple of "
                f"rollout.samples_per_prompt ({k})"
            )
        if p.group_minibatches and p.mini_batch_size % k:
            raise ConfigError(
                f"ppo.group_minibatches puts whole groups of rollout.samples_per_prompt ({k}) episodes in a "
                f"minibatch: ppo.mini_batch_size ({p.mini_batch_size}) must be a multiple of {k}"
            )
        from rlhf.algorithms import ADVANTAGE_NEEDS

        if k < ADVANTAGE_NEEDS[p.advantage].group_size:
            raise ConfigError(
                f"ppo.advantage: {p.advantage} compares the responses to the same prompt: set "
                "rollout.samples_per_prompt >= 2 (RLOO used 2-4, GRPO 64 on maths)"
            )
        if p.objective == "klpen":
            _positive(p.klpen_coef, "ppo.klpen_coef")
            _positive(p.klpen_target, "ppo.klpen_target")
        if r.function and (":" not in r.function or r.function.startswith(":") or r.function.endswith(":")):
            raise ConfigError(f"reward.function must be 'module:function', got {r.function!r}")
        if not r.function and not self.models.reward.name_or_path:
            raise ConfigError("no reward: set models.reward.name_or_path (a reward model) and/or reward.function")
        if r.function and self.models.reward.name_or_path and r.model_weight == 0 and r.function_weight == 0:
            raise ConfigError("reward.model_weight and reward.function_weight are both 0: the reward would be 0")
        if self.uses_critic() and self.models.value_init == "reward" and not self.models.reward.name_or_path:
            raise ConfigError(
                "the value model starts from the reward model (models.value_init: reward) but there is none: set "
                "models.value_init: policy, or a critic-free ppo.advantage (rloo, grpo, reinforce + baseline: mean)"
            )

    def paths(self) -> dict[str, str]:
        reward = _model_paths(self.models.reward, "models.reward") if self.models.reward.name_or_path else {}
        return (
            _source_paths(self.data, ("prompts", "eval_prompts"))
            | _source_paths(self.ptx, ("data",), prefix="ptx")
            | _model_paths(self.models.policy, "models.policy")
            | reward
        )


@dataclass
class EvalConfig:
    output_dir: str = "runs/eval"
    """Where eval.json and samples.jsonl go."""
    seed: int = 0
    """Seed for sampling."""
    policy: str = ""
    """The trained policy (ppo/final); or leave empty and set run_dir."""
    run_dir: str = ""
    """A PPO output dir: evaluate every checkpoint and final/, write frontier.json and frontier.png."""
    select_best: bool = False
    """With run_dir: make the checkpoint with the best held-out proxy score the run's final/ (the last one is kept
    as final-last/)."""
    sft: str = ""
    """The SFT model: baseline for scores and win-rate, and the reference for KL and fluency."""
    reward_model: str = ""
    """Reward model dir (or ensemble dir) PPO optimised (empty = no RM scores)."""
    proxy_reward_model: str = ""
    """A reward model PPO never optimised, for the held-out proxy score (empty = reward_model's held-out
    ensemble members, if any)."""
    prompts: TextSource = field(default_factory=TextSource)
    """Held-out prompts."""
    pretrain_eval: TextSource = field(default_factory=TextSource)
    """Held-out pretraining text: both models' LM loss on it (empty = skip)."""
    judge: str = ""
    """`module:function` (prompt, response) -> float, e.g. rlhf.tiny:gold_judge; empty = RM-judged win-rate."""
    num_prompts: int = 0
    """Evaluate on at most this many prompts (0 = all)."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt and model."""
    max_new_tokens: int = 64
    """Longest response."""
    temperature: float = 1.0
    """Sampling temperature (KL and fluency are computed at the same temperature)."""
    batch_size: int = 64
    """Prompts per generate() call."""
    format: FormatConfig = field(default_factory=FormatConfig)
    """Prompt rendering (must match training)."""
    collapse: CollapseLimits = field(default_factory=CollapseLimits)
    """With run_dir: a checkpoint whose collapse signs cross these limits is flagged and never selected."""
    trust_remote_code: bool = False
    """Allow model code from the hub."""

    def validate(self) -> None:
        self.collapse.validate("collapse")
        if not self.sft:
            raise ConfigError("sft is required (a model dir)")
        if bool(self.policy) == bool(self.run_dir):
            raise ConfigError("set exactly one of policy (a model dir) and run_dir (a PPO output dir)")
        if self.select_best and not self.run_dir:
            raise ConfigError("select_best needs run_dir (the PPO run whose checkpoints are compared)")
        if not self.prompts.path:
            raise ConfigError("prompts.path is required")
        if self.judge and ":" not in self.judge:
            raise ConfigError(f"judge must look like 'module:function', got {self.judge!r}")
        _positive(self.temperature, "temperature")
        _positive(self.samples_per_prompt, "samples_per_prompt")

    def paths(self) -> dict[str, str]:
        out = {"sft": self.sft, "prompts.path": self.prompts.path}
        for key in ("policy", "run_dir", "reward_model", "proxy_reward_model"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.pretrain_eval.path:
            out["pretrain_eval.path"] = self.pretrain_eval.path
        return out


@dataclass
class DPOData:
    train: TextSource = field(default_factory=TextSource)
    """Preference rows (as the RM stage reads them): chosen/rejected pairs or K-way `ranked` lists."""
    eval: TextSource = field(default_factory=TextSource)
    """Held-out preference rows for loss and preference accuracy (empty path = none)."""
    format: FormatConfig = field(default_factory=FormatConfig)
    """Prompt rendering and truncation (must match the SFT stage)."""
    packing: bool = False
    """Pack each micro-batch's responses (with their prompts) into sequences of up to format.max_length tokens
    (best fit, no attention across them): no padding to a pair's longer response (variable-length pairs: 1.22x the
    tokens/s at 19% less peak memory, docs/benchmarks.md)."""


@dataclass
class DPOLoss:
    label_smoothing: float = 0.0
    """cDPO: assumed probability that a preference label is flipped, in [0, 0.5) (0 = the paper's DPO loss)."""


@dataclass
class DPOConfig:
    output_dir: str = "runs/dpo"
    """Where checkpoints, final/, metrics.jsonl and config.yaml go."""
    seed: int = 0
    """Seed for python, numpy and torch."""
    resume: str = "auto"
    """auto = newest complete checkpoint in output_dir; never; or a checkpoint path."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy, initialised from SFT (sft/final); the frozen reference is the same weights."""
    reference: Literal["copy", "disable_adapter"] = "copy"
    """copy = a second frozen copy of SFT; disable_adapter = the LoRA policy with its adapter off."""
    beta: float = 0.1
    """beta: strength of the implicit KL constraint to the reference (DPO paper: 0.1)."""
    share_prompt: bool = False
    """Run each prompt once per micro-batch, its responses on the prompt's KV cache (policy and reference, forward and
    backward): the same log-probs and gradients up to float rounding, with (K-1)/K of the prompt tokens' work gone.
    Pays where prompts are long against responses (multi-turn dialogues: 1.7-1.9x for pairs with 128-256-token
    prompts), within noise on short ones (docs/benchmarks.md). Not with data.packing, gradient checkpointing or
    train.compile; skipped under FSDP / ZeRO-3."""
    data: DPOData = field(default_factory=DPOData)
    loss: DPOLoss = field(default_factory=DPOLoss)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=64, micro_batch_size=4))
    """batch_size = prompts per step; each brings every ordered pair of its ranked responses."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=150, scheduler="constant"))
    """DPO paper: LR 1e-6, linear warm-up over 150 steps, then constant."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        _check_common(self)
        _positive(self.beta, "beta")
        if not 0.0 <= self.loss.label_smoothing < 0.5:
            raise ConfigError(
                "loss.label_smoothing must be in [0, 0.5) (the assumed label-flip rate), "
                f"got {self.loss.label_smoothing}"
            )
        if self.reference == "disable_adapter" and not self.model.lora.enabled:
            raise ConfigError(
                "reference: disable_adapter needs model.lora.enabled: true "
                "(without an adapter there is nothing to disable); use reference: copy"
            )
        if self.reference == "disable_adapter" and self.model.from_config:
            raise ConfigError("reference: disable_adapter cannot work with model.from_config: true (no SFT weights)")
        _check_share_prompt(self)

    def paths(self) -> dict[str, str]:
        return _source_paths(self.data, ("train", "eval")) | _model_paths(self.model, "model")


STAGES: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig, "eval": EvalConfig}


# --------------------------------------------------------------------------------------------------
# Checks shared by the stages
# --------------------------------------------------------------------------------------------------


def _positive(value: float, key: str) -> None:
    if not 0 < value < float("inf"):  # also rejects nan, which compares false with everything
        raise ConfigError(f"{key} must be > 0 and finite, got {value}")


def _check_share_prompt(cfg: Any) -> None:
    """DPO / RM share_prompt: the responses run on their prompt's KV cache, which these cannot go with."""
    if not cfg.share_prompt:
        return
    settings = (
        ("data.packing", cfg.data.packing),
        ("model.gradient_checkpointing", cfg.model.gradient_checkpointing),
        ("train.compile", cfg.train.compile),
    )
    clash = [name for name, on in settings if on]
    if clash:
        raise ConfigError(
            f"share_prompt runs responses on their prompt's KV cache, which {' and '.join(clash)} cannot go with "
            "(packing lays rows side by side, checkpointed layers drop the cache, train.compile compiles "
            "whole-sequence forwards only): turn share_prompt off, or those"
        )


TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")


def _check_common(cfg: Any) -> None:
    if cfg.resume not in ("auto", "never") and not cfg.resume:
        raise ConfigError("resume must be auto, never or a checkpoint path")
    unknown = [t for t in cfg.logging.report_to if t not in TRACKERS]
    if unknown:
        raise ConfigError(f"logging.report_to: unknown tracker(s) {unknown}; choose from {list(TRACKERS)}")
    t, o = cfg.train, cfg.optim
    if t.max_steps < 0:
        raise ConfigError(f"train.max_steps must be >= 0, got {t.max_steps}")
    if t.max_steps == 0 and t.epochs <= 0:
        raise ConfigError("set train.max_steps > 0 or train.epochs > 0")
    _positive(t.batch_size, "train.batch_size")
    _positive(t.micro_batch_size, "train.micro_batch_size")
    if t.max_nonfinite_skips < 0:
        raise ConfigError(f"train.max_nonfinite_skips must be >= 0, got {t.max_nonfinite_skips}")
    if t.micro_batch_size > t.batch_size:
        raise ConfigError(
            f"train.micro_batch_size ({t.micro_batch_size}) is larger than train.batch_size ({t.batch_size})"
        )
    _positive(o.lr, "optim.lr")
    if o.weight_decay < 0 or o.max_grad_norm < 0 or o.eps <= 0:
        raise ConfigError("optim.weight_decay and optim.max_grad_norm must be >= 0 and optim.eps > 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    if o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1 or not 0 <= o.warmup_start_ratio <= 1:
        raise ConfigError("optim.warmup_steps >= 0, optim.min_lr_ratio and optim.warmup_start_ratio in [0, 1]")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 0:
        raise ConfigError("checkpoint.every and checkpoint.keep_last must be >= 0")
    _positive(cfg.logging.every, "logging.every")


def _source_paths(section: Any, names: tuple[str, ...], prefix: str = "data") -> dict[str, str]:
    return {f"{prefix}.{n}.path": getattr(section, n).path for n in names if getattr(section, n).path}


def _model_paths(model: ModelConfig, prefix: str) -> dict[str, str]:
    out = {f"{prefix}.name_or_path": model.name_or_path}
    if model.tokenizer:
        out[f"{prefix}.tokenizer"] = model.tokenizer
    return out


def load_function(spec: str, key: str):
    """'module:function' named by config key `key` -> the callable (e.g. (prompt, response) -> float)."""
    module_name, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key} {spec!r} cannot be imported: {e}") from None


def looks_local(path: str) -> bool:
    """True for strings that can only mean a local path (so a missing one is an error, not a hub name).

    Hub ids are "name" or "org/name", so a single "/" alone is not enough to call something a path."""
    return (
        path.startswith(("/", "./", "../", "~", "runs/"))
        or path.endswith((".json", ".jsonl", ".parquet", ".yaml"))
        or path.count("/") > 1
        or (os.sep != "/" and os.sep in path)
    )


# what a local dir must hold to load as a model, a tokenizer or a dataset
MODEL_CONFIG_FILES = ("config.json", "adapter_config.json", "ensemble.json")  # a model, a peft adapter, an RM ensemble
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
DATASET_DIR_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
MODEL_KEYS = ("sft", "policy", "reward_model", "proxy_reward_model")  # eval's model dirs (run_dir is a run)


def check_paths(cfg: Any, source: str = "<config>") -> None:
    """Fail before any model loads when a local path named by the config does not exist or is not what its key
    needs: a model dir with its config, weights and tokenizer (or a `tokenizer:` key); a tokenizer dir with
    tokenizer files; a data file of a readable type or a `save_to_disk` dir. Each error names the key, the path,
    the config file and the fix."""
    paths = cfg.paths()
    for key, path in paths.items():
        if not path:
            raise ConfigError(f"{key} is empty in {source}: set it to a model dir or hub name")
        if not looks_local(path) and not Path(path).expanduser().exists():
            continue  # a hub name: checked where it loads
        local = Path(path).expanduser()
        if not local.exists():
            raise ConfigError(
                f"{key} = {path!r} (from {source}) does not exist; run the stage that produces it first, "
                "or fix the path"
            )
        where = f"{key} = {path!r} (from {source})"
        if key.endswith(".name_or_path") or key in MODEL_KEYS:
            prefix = key.removesuffix(".name_or_path")
            model = _model_config_at(cfg, prefix) if key.endswith(".name_or_path") else None
            _check_model_dir(local, where, f"{prefix}.tokenizer" in paths, model, prefix)
        elif key.endswith(".tokenizer"):
            if not local.is_dir() or not _has_any(local, TOKENIZER_FILES):
                raise ConfigError(
                    f"{where} is not a tokenizer dir (none of {', '.join(TOKENIZER_FILES)}): point it at a dir "
                    "written by tokenizer.save_pretrained, e.g. a stage's final/"
                )
        elif key.endswith(".path"):
            _check_data_path(local, where)


def _model_config_at(cfg: Any, prefix: str) -> ModelConfig | None:
    value = cfg
    for name in prefix.split("."):
        value = getattr(value, name, None)
    return value if isinstance(value, ModelConfig) else None


def _has_any(directory: Path, names: tuple[str, ...]) -> bool:
    return any((directory / n).is_file() for n in names)


def _check_model_dir(path: Path, where: str, has_tokenizer_key: bool, model: ModelConfig | None, prefix: str):
    if not path.is_dir():
        raise ConfigError(f"{where} is a file, not a model dir: point it at the dir holding config.json")
    if not _has_any(path, MODEL_CONFIG_FILES):
        raise ConfigError(
            f"{where} has no config.json (nor adapter_config.json / ensemble.json): not a saved model; point it at "
            "a stage's final/ or a dir written by save_pretrained"
        )
    if (path / "ensemble.json").is_file():
        return  # an RM ensemble: its members are checked where they load
    from_config = model is not None and model.from_config
    if not from_config and not any(next(path.glob(g), None) for g in WEIGHT_GLOBS):
        raise ConfigError(
            f"{where} has a config but no weights (*.safetensors / *.bin): point it at the saved model, or set "
            f"{prefix}.from_config: true to start from random weights"
        )
    if not has_tokenizer_key and not _has_any(path, TOKENIZER_FILES):
        key = f"{prefix}.tokenizer" if model is not None else "the model dir"
        raise ConfigError(
            f"{where} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): set {key} to a tokenizer dir or hub "
            "name, or save the tokenizer into the model dir"
        )


def _check_data_path(path: Path, where: str) -> None:
    if path.is_dir():
        if not _has_any(path, DATASET_DIR_FILES) and not any(
            (d / "dataset_info.json").is_file() for d in path.iterdir() if d.is_dir()
        ):
            raise ConfigError(
                f"{where} is a dir but not a dataset written by datasets' save_to_disk (no dataset_info.json / "
                "dataset_dict.json): point it at a .json, .jsonl or .parquet file or a save_to_disk dir"
            )
    elif not path.name.endswith(DATA_SUFFIXES):
        raise ConfigError(f"{where}: unsupported file type; use .json, .jsonl, .parquet or a save_to_disk dir")


# --------------------------------------------------------------------------------------------------
# Loading: YAML -> dataclass with type checks, overrides, did-you-mean
# --------------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = f"{key} (in {source})"
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and value not in args:
            # YAML 1.1 reads off/on/no/yes as booleans: map back to the choice spelled that way (progress: off)
            words = ("true", "on", "yes", "y") if value else ("false", "off", "no", "n")
            spelled = [a for a in args if isinstance(a, str) and a.lower() in words]
            if len(spelled) == 1:
                value = spelled[0]
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key, source)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], key, source): _coerce(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):  # nan slips through every range check; inf means nothing
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    base = cls()
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {full!r} in {source}{hint} (known: {', '.join(names)})")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            # Merge into the stage's own default for this section, so defaults set by the stage survive.
            merged = dataclasses.asdict(getattr(base, key))
            kwargs[key] = _build(hints[key], _deep_merge(merged, value), full, source)
        else:
            kwargs[key] = _coerce(value, hints[key], full, source)
    return dataclasses.replace(base, **kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], value parsed as YAML, so 1e-4, true, [1, 2] and {k: v} all work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def load_config(stage: str, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Defaults -> YAML file -> `--set` overrides; validated. Raises ConfigError naming the key and the file."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; one of {sorted(STAGES)}")
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if p.is_dir():
            yamls = sorted(x.name for x in p.glob("*.yaml"))[:6]
            raise ConfigError(
                f"config file {source} is a directory; name one YAML in it"
                + (f" ({', '.join(yamls)})" if yamls else "")
            )
        if not p.is_file():
            raise ConfigError(f"config file {source} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source} is not valid UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source} is not valid YAML: {' '.join(str(e).split())}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    label = source + (" with --set overrides" if overrides else "")
    cfg = _build(STAGES[stage], data, "", label)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{e} (in {label})") from None
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the fully resolved config as YAML (readable by load_config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
