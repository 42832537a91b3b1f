"""`rlhf eval`: sample the SFT model and the trained policy on held-out prompts and compare them.

Reports, for both models: the judge's mean score (the tiny world's gold judge, or any `module:function`),
the reward model's mean score, and the signs of reward hacking — mean response length, share ending with EOS,
distinct-1/distinct-2 over all samples, and the SFT model's mean per-token log-likelihood of the samples
(fluency). Plus the policy-vs-SFT win-rate (judge, else RM; ties count half) and `kl_to_sft`, the mean
per-sequence KL of the policy from SFT on the policy's own samples. Optionally both models' LM loss on
held-out pretraining text (what PPO-ptx protects). Ends with one JSON line, also saved as `eval.json`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from rlhf.batching import TruncationReport, encode_prompts, encode_text, pad, response_sequences
from rlhf.config import ConfigError, EvalConfig, ModelConfig, check_paths, save_config
from rlhf.data import load_source
from rlhf.models import causal_logits, inference_device, load_causal_lm, load_reward_model, load_tokenizer
from rlhf.ppo_math import logprobs_from_logits, truncate_after_eos
from rlhf.reward import score_sequences
from rlhf.sampling import decode_responses, generate
from rlhf.sft import summed_lm_loss
from rlhf.training import ProgressBar, seed_everything, write_json


def load_judge(spec: str):
    """'module:function' -> the callable (prompt, response) -> float."""
    module_name, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"judge {spec!r} cannot be imported: {e}") from None


def distinct_n(token_lists: list[list[int]], n: int) -> float:
    """Unique n-grams / all n-grams over every sample (Li et al. 2016); low values mean repetitive outputs."""
    grams = [tuple(t[i : i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[list[int]], cfg: EvalConfig, desc: str) -> list[list[int]]:
    """Response token ids (through EOS when it ended) for every prompt."""
    out = []
    bar = ProgressBar(len(prompts), desc, "auto")
    for s in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[s : s + cfg.batch_size]
        _, _, resp = generate(model, tokenizer, chunk, cfg.max_new_tokens, cfg.temperature)
        _, mask = truncate_after_eos(resp, tokenizer.eos_token_id, tokenizer.pad_token_id)
        out.extend([r[m].tolist() for r, m in zip(resp, mask)])
        bar.update(len(chunk))
    bar.close()
    return out


@torch.no_grad()
def sequence_logprobs(model, prompts, responses, pad_id: int, temperature: float, batch: int) -> list[torch.Tensor]:
    """Per-token log-probs of each response given its prompt (a list of [R_i] tensors)."""
    out = []
    for s in range(0, len(prompts), batch):
        p, r = prompts[s : s + batch], responses[s : s + batch]
        seqs = [a + b for a, b in zip(p, r)]
        device = next(model.parameters()).device
        ids, mask = pad(seqs, pad_id).to(device), pad([[1] * len(x) for x in seqs], 0).to(device)
        logits = causal_logits(model, ids, mask)
        lp = logprobs_from_logits(logits[:, :-1], ids[:, 1:], temperature)
        for i, (a, b) in enumerate(zip(p, r)):
            out.append(lp[i, len(a) - 1 : len(a) - 1 + len(b)].cpu())
    return out


def run(cfg: EvalConfig, source: str = "<config>") -> dict:
    """Evaluate; prints and returns the result dict and writes `<output_dir>/eval.json` and `samples.jsonl`."""
    check_paths(cfg, source)
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    judge = load_judge(cfg.judge) if cfg.judge else None
    tokenizer = load_tokenizer(cfg.sft, cfg.trust_remote_code)
    ds = load_source(cfg.prompts, "prompts", max_rows=cfg.num_prompts or None)
    rows = [r for r in ds.to_list() for _ in range(cfg.samples_per_prompt)]
    prompts = encode_prompts(tokenizer, cfg.format, rows)
    device = inference_device()

    def load(path: str):
        model_cfg = ModelConfig(name_or_path=path, trust_remote_code=cfg.trust_remote_code)
        return load_causal_lm(model_cfg, tokenizer, dropout=False).eval().to(device)

    sft, policy = load(cfg.sft), load(cfg.policy)
    responses, texts = {}, {}
    for name, model in (("sft", sft), ("policy", policy)):
        torch.manual_seed(cfg.seed)  # both models sample with the same random stream
        responses[name] = sample(model, tokenizer, prompts, cfg, f"eval {name}")
        texts[name] = decode_responses(
            tokenizer, pad([r or [tokenizer.pad_token_id] for r in responses[name]], tokenizer.pad_token_id)
        )
    eos = tokenizer.eos_token_id
    result: dict = {"num_samples": len(prompts)}
    sft_logprobs = {}  # the SFT model's log-likelihood of each model's samples, at temperature 1
    for name in ("sft", "policy"):
        resp = responses[name]
        content = [[t for t in r if t != eos] for r in resp]
        sft_lp = sequence_logprobs(sft, prompts, resp, tokenizer.pad_token_id, 1.0, cfg.batch_size)
        sft_logprobs[name] = sft_lp
        tokens = sum(len(x) for x in sft_lp)
        result |= {
            f"length_{name}": sum(len(c) for c in content) / len(content),
            f"eos_share_{name}": sum(bool(r) and r[-1] == eos for r in resp) / len(resp),
            f"distinct1_{name}": distinct_n(content, 1),
            f"distinct2_{name}": distinct_n(content, 2),
            f"sft_logprob_{name}": float(sum(x.sum() for x in sft_lp) / max(tokens, 1)),
        }
    # KL(policy || SFT) per sequence on the policy's own samples, at the sampling temperature
    pol_lp = sequence_logprobs(
        policy, prompts, responses["policy"], tokenizer.pad_token_id, cfg.temperature, cfg.batch_size
    )
    ref_lp = (
        sft_logprobs["policy"]
        if cfg.temperature == 1.0
        else sequence_logprobs(
            sft, prompts, responses["policy"], tokenizer.pad_token_id, cfg.temperature, cfg.batch_size
        )
    )
    result["kl_to_sft"] = float(sum((a - b).sum() for a, b in zip(pol_lp, ref_lp)) / len(prompts))

    per_sample = {"sft": {}, "policy": {}}
    if cfg.reward_model:
        rm_tok = load_tokenizer(cfg.reward_model, cfg.trust_remote_code)
        rm = load_reward_model(
            ModelConfig(name_or_path=cfg.reward_model, trust_remote_code=cfg.trust_remote_code), rm_tok
        )
        rm.to(device)
        for name in ("sft", "policy"):
            ended = [bool(r) and r[-1] == eos for r in responses[name]]
            seqs = response_sequences(rm_tok, cfg.format, rows, texts[name], ended)
            scores = score_sequences(rm, seqs, cfg.batch_size, rm_tok.pad_token_id, device, normalized=True).tolist()
            per_sample[name]["rm"] = scores
            result[f"rm_score_{name}"] = sum(scores) / len(scores)
    if judge is not None:
        for name in ("sft", "policy"):
            per_sample[name]["gold"] = [float(judge(r["prompt"], t)) for r, t in zip(rows, texts[name])]
            result[f"gold_score_{name}"] = sum(per_sample[name]["gold"]) / len(rows)
    key = "gold" if judge is not None else ("rm" if cfg.reward_model else None)
    if key:
        a, b = per_sample["policy"][key], per_sample["sft"][key]
        result["win_rate"] = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)
        result["win_rate_judged_by"] = "judge" if key == "gold" else "reward_model"
    if cfg.pretrain_eval.path:
        ds = load_source(cfg.pretrain_eval, "text")
        examples = encode_text(tokenizer, ds["text"], cfg.format.max_length, TruncationReport())
        for name, model in (("sft", sft), ("policy", policy)):
            loss_sum, tokens = summed_lm_loss(model, examples, cfg.batch_size, tokenizer.pad_token_id, device)
            result[f"pretrain_loss_{name}"] = loss_sum / max(tokens, 1)

    result = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.items()}
    with (out_dir / "samples.jsonl").open("w") as f:
        for i, r in enumerate(rows):
            row = {"prompt": r["prompt"], "sft": texts["sft"][i], "policy": texts["policy"][i]}
            for name in ("sft", "policy"):
                row |= {f"{k}_{name}": round(v[i], 4) for k, v in per_sample[name].items()}
            f.write(json.dumps(row) + "\n")
    write_json(out_dir / "eval.json", result)
    print(json.dumps(result, sort_keys=True))
    return result
