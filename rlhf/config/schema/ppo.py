"""Stage 3 (PPO-ptx) config: rollout sampling, the KL penalty and its controller, reward shaping, the PPO
update (GAE / REINFORCE / RLOO / GRPO advantages, clipped or KL-penalised surrogate), the pretraining mix, EMA and
the collapse guard. Run-time decisions derived from it live in rlhf.stages.ppo.settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.config.errors import ConfigError
from rlhf.config.schema.common import (
    CheckpointConfig,
    CollapseLimits,
    FormatConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RunSettings,
    TextSource,
    TrainConfig,
    model_paths,
    source_paths,
)
from rlhf.config.validation import check_common, positive


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
    up to float rounding, without (k-1)/k of the prompt tokens' work. Off under FSDP/ZeRO-3; the scoring half also
    for a reward model with its own tokenizer."""


@dataclass
class KLConfig:
    kl_coef: float = 0.02
    """beta: per-token KL penalty to the SFT reference (InstructGPT: 0.02); the starting beta when adaptive."""
    adaptive: bool = False
    """Adapt beta so the KL per sequence holds at `target` (see `controller`)."""
    controller: Literal["antiwindup", "pi", "proportional"] = "antiwindup"
    """antiwindup = PI control of log(beta) without integral windup (holds the target when the policy is slow to
    move, then takes off); pi = the same without the anti-windup; proportional = Ziegler et al. 2019."""
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

    def validate(self) -> None:
        if self.kl_coef < 0:
            raise ConfigError(f"kl.kl_coef must be >= 0, got {self.kl_coef}")
        if self.adaptive:
            positive(self.target, "kl.target")
            positive(self.kl_coef, "kl.kl_coef (the starting beta of an adaptive controller)")
            positive(self.horizon, "kl.horizon")
            if not 0 < self.min_coef <= self.max_coef:
                raise ConfigError(f"need 0 < kl.min_coef <= kl.max_coef, got {self.min_coef} and {self.max_coef}")
            if not 0 < self.smoothing <= 1:
                raise ConfigError(f"kl.smoothing must be in (0, 1], got {self.smoothing}")
            if self.min_share <= 0 or self.max_error < 1 or self.max_step <= 0:
                raise ConfigError(
                    f"need kl.min_share > 0, kl.max_error >= 1 and kl.max_step > 0, got {self.min_share}, "
                    f"{self.max_error} and {self.max_step}"
                )
            if self.p_gain < 0 or self.i_gain <= 0 or self.lookahead < 0:
                raise ConfigError(
                    f"need kl.p_gain >= 0, kl.i_gain > 0 and kl.lookahead >= 0, got {self.p_gain}, {self.i_gain}, "
                    f"{self.lookahead}"
                )
        if self.budget < 0:
            raise ConfigError(f"kl.budget must be >= 0 (0 = off), got {self.budget}")


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
    whose layers drop the KV cache). Pays with prompts of tens of tokens and more; on tiny models with short
    prompts the second forward costs more than it saves (docs/benchmarks.md). Off: episodes shuffled singly, as
    TRL and OpenRLHF do.
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
class PPOConfig(RunSettings):
    output_dir: str = "runs/ppo"
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
        check_common(self)
        self._validate_sizes()
        self.kl.validate()
        self.collapse.validate("collapse")
        positive(self.collapse.window, "collapse.window")
        positive(self.kl.budget_window, "kl.budget_window")
        if self.reward.std_coef < 0:
            raise ConfigError(f"reward.std_coef must be >= 0, got {self.reward.std_coef}")
        if self.ptx.ptx_coef < 0:
            raise ConfigError(f"ptx.ptx_coef must be >= 0, got {self.ptx.ptx_coef}")
        if self.ptx.ptx_coef > 0 and not self.ptx.data.path:
            raise ConfigError("ptx.ptx_coef > 0 needs ptx.data.path (pretraining text)")
        if not 0 <= self.ema.decay < 1:
            raise ConfigError(f"ema.decay must be in [0, 1), got {self.ema.decay}")
        self._validate_reference()
        self._validate_lineage()

    def _validate_sizes(self) -> None:
        p = self.ppo
        positive(p.mini_batch_size, "ppo.mini_batch_size")
        positive(p.micro_batch_size, "ppo.micro_batch_size")
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
        positive(p.ppo_epochs, "ppo.ppo_epochs")
        if not 0 < p.cliprange < 1:
            raise ConfigError(f"ppo.cliprange must be in (0, 1), got {p.cliprange}")
        if not (0 <= p.gamma <= 1 and 0 <= p.lam <= 1):
            raise ConfigError("ppo.gamma and ppo.lam must be in [0, 1]")
        positive(self.rollout.temperature, "rollout.temperature")
        positive(self.rollout.max_new_tokens, "rollout.max_new_tokens")

    def _validate_reference(self) -> None:
        k = self.kl
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

    def _validate_lineage(self) -> None:
        p, k, r = self.ppo, self.rollout.samples_per_prompt, self.reward
        positive(k, "rollout.samples_per_prompt")
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
        from rlhf.algorithms import ADVANTAGE_NEEDS  # torch-free config module: the registry loads on use

        if k < ADVANTAGE_NEEDS[p.advantage].group_size:
            raise ConfigError(
                f"ppo.advantage: {p.advantage} compares the responses to the same prompt: set "
                "rollout.samples_per_prompt >= 2 (RLOO used 2-4, GRPO 64 on maths)"
            )
        if p.objective == "klpen":
            positive(p.klpen_coef, "ppo.klpen_coef")
            positive(p.klpen_target, "ppo.klpen_target")
        if r.function and (":" not in r.function or r.function.startswith(":") or r.function.endswith(":")):
            raise ConfigError(f"reward.function must be 'module:function', got {r.function!r}")
        if not r.function and not self.models.reward.name_or_path:
            raise ConfigError("no reward: set models.reward.name_or_path (a reward model) and/or reward.function")
        if r.function and self.models.reward.name_or_path and r.model_weight == 0 and r.function_weight == 0:
            raise ConfigError("reward.model_weight and reward.function_weight are both 0: the reward would be 0")
        if uses_critic(self) and self.models.value_init == "reward" and not self.models.reward.name_or_path:
            raise ConfigError(
                "the value model starts from the reward model (models.value_init: reward) but there is none: set "
                "models.value_init: policy, or a critic-free ppo.advantage (rloo, grpo, reinforce + baseline: mean)"
            )

    def paths(self) -> dict[str, str]:
        reward = model_paths(self.models.reward, "models.reward") if self.models.reward.name_or_path else {}
        return (
            source_paths(self.data, ("prompts", "eval_prompts"))
            | source_paths(self.ptx, ("data",), prefix="ptx")
            | model_paths(self.models.policy, "models.policy")
            | reward
        )


def uses_critic(cfg: PPOConfig) -> bool:
    """Whether the advantage estimator needs a value model (GAE, REINFORCE with a learned baseline). A run-time
    decision that validation needs too, so it lives here; rlhf.stages.ppo.settings re-exports it."""
    from rlhf.algorithms import ADVANTAGE_NEEDS  # torch-free config module: the registry loads on use

    critic = ADVANTAGE_NEEDS[cfg.ppo.advantage].critic
    return cfg.ppo.baseline == "value" if critic is None else critic
