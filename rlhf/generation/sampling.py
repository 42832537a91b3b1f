"""Batched sampling shared by PPO rollouts, evaluation, SFT sample logging and `rlhf generate`.

Sampling is Gumbel-max with one random stream per episode when `seeds` are given: argmax(logits / T + G) with
G ~ Gumbel(0, 1) i.i.d. is an exact sample of softmax(logits / T) (after top-k / top-p filtering), and because each
row draws its noise from its own generator, a row's tokens do not depend on which other rows share its batch,
chunk or process. That is what lets 2 processes sample the very episodes 1 process samples.

The checkpoint's `generation_config.json` is never applied: a hub model's defaults (Qwen2.5-Instruct ships
repetition_penalty 1.05, top_k 20, top_p 0.8) would change the distribution PPO's log-probs are computed under.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from rlhf.algorithms import truncate_after_eos
from rlhf.data.batching import pad
from rlhf.models.forwards import cache_keyword
from rlhf.runtime.tracking import log_text


def episode_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys, e.g. (run seed, stream, iteration, episode): well mixed, stable everywhere."""
    state = np.random.SeedSequence([k % 2**32 for k in keys]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


class EpisodeGumbelNoise(LogitsProcessor):
    """Adds Gumbel(0, 1) noise drawn from each row's own generator; greedy decoding then samples (Gumbel-max)."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniform = torch.stack(
            [torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators]
        )
        # u in [0, 1): u = 0 gives -inf noise (never chosen), as a zero-probability draw should
        return scores + -torch.log(-torch.log(uniform))


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    seeds: list[int] | None = None,
    synced: bool = False,
    prefill: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one response per prompt from the model's own distribution, with the KV cache.

    Prompts are left-padded so every row's response starts at the same column. `seeds` (one per prompt) give each
    row its own random stream (see the module docstring); without them the global torch RNG is used. `synced`
    keeps every process decoding until all are done (sharded parameters: FSDP, ZeRO-3). `prefill(model, prompt_ids,
    prompt_mask)` may return the KV cache of the prompts' first P-1 columns (e.g. `shared_prompt.shared_prefill`: a
    group's prompt run once), from which generation runs the last column on; None runs the whole prompt. Returns
    (prompt_ids [B,P] left-padded, prompt_mask [B,P], response_ids [B,R]) where every token after a row's
    first EOS is PAD. Generation stops when every row has produced EOS or after max_new_tokens.
    """
    device = next(model.parameters()).device
    prompt_ids = pad(prompts, tokenizer.pad_token_id, side="left").to(device)
    prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left").to(device)
    config, processors = _sampling_config(
        tokenizer, len(prompts), max_new_tokens, temperature, top_k, top_p, do_sample, seeds, device
    )
    was_training = model.training
    # the Hugging Face model whose generate() reads generation_config (inside a peft wrapper: the base model)
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved_config = hf_model.generation_config
    model.eval()
    hf_model.generation_config = GenerationConfig()
    try:
        cache = prefill(model, prompt_ids, prompt_mask) if prefill else None
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            generation_config=config,
            logits_processor=processors,
            synced_gpus=synced,
            **({} if cache is None else {cache_keyword(model): cache}),
        )
    finally:
        hf_model.generation_config = saved_config
        model.train(was_training)
    responses = out[:, prompt_ids.shape[1] :]
    if responses.shape[1] == 0:
        responses = torch.full((len(prompts), 1), tokenizer.pad_token_id, device=device, dtype=torch.long)
    responses, _ = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return prompt_ids, prompt_mask, responses


def _sampling_config(
    tokenizer, n_prompts: int, max_new_tokens: int, temperature, top_k, top_p, do_sample, seeds, device
) -> tuple[GenerationConfig, LogitsProcessorList]:
    """`generate`'s GenerationConfig and logits processors: the library's sampling without `seeds`, greedy decoding
    over temperature / top-k / top-p warpers and per-row Gumbel noise with them."""
    # only the library's global defaults plus what is set here: nothing from the checkpoint's generation_config
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample and seeds is None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    processors = LogitsProcessorList()
    if do_sample and seeds is None:
        # top_k 0 must be passed as 0: a None is filled with the library default (50)
        config.temperature, config.top_k, config.top_p = temperature, top_k, top_p
    elif do_sample:
        if len(seeds) != n_prompts:
            raise ValueError(f"generate: {len(seeds)} seeds for {n_prompts} prompts")
        processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        processors.append(EpisodeGumbelNoise(seeds, device))
    return config, processors


def decode_responses(tokenizer, responses: torch.Tensor) -> list[str]:
    """Response ids [B,R] -> text without EOS/PAD."""
    return tokenizer.batch_decode(responses, skip_special_tokens=True)


def log_generations(accelerator, model, tokenizer, prompts: list[list[int]], output_dir, step: int) -> None:
    """Sample a response to each held-out prompt (token ids rendered as the model sees them) and write the pairs to
    samples.jsonl (main process only): what SFT and DPO log at each evaluation."""
    if not prompts or not accelerator.is_main_process:
        return
    _, _, responses = generate(model, tokenizer, prompts, max_new_tokens=64)
    texts = decode_responses(tokenizer, responses)
    rows = [{"prompt": tokenizer.decode(p), "response": t} for p, t in zip(prompts, texts)]
    log_text(accelerator, output_dir, step, rows)
