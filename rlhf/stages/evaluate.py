"""`rlhf eval`: sample the SFT model and the trained policy on held-out prompts and compare them.

Reports, for both models: the judge's mean score (the tiny world's gold judge, or any `module:function`),
the reward model's mean score, and the signs of reward hacking — mean response length, share ending with EOS,
distinct-1/distinct-2 over all samples, and the SFT model's mean per-token log-likelihood of the samples
(fluency). Plus the policy-vs-SFT win-rate (judge, else RM; ties count half) and `kl_to_sft`, the mean
per-sequence KL of the policy from SFT on the policy's own samples. Optionally both models' LM loss on
held-out pretraining text (what PPO-ptx protects). Ends with one JSON line, also saved as `eval.json`.

With `run_dir` (a PPO output dir) it measures the same for every checkpoint and the final policy — plus the
held-out proxy score from a reward model PPO never optimised — and writes `frontier.json` and `frontier.png`: score
against KL, the reward over-optimisation curve (Gao et al. 2022), beside each checkpoint's collapse signs
(rlhf.algorithms.collapse: repeats within a response, distinct-2, length and EOS share against SFT's, KL past the
run's limit). The best checkpoint is the one with the highest proxy score among those no collapse sign flags —
never chosen by the gold judge (a real user has none); `select_best` makes it the run's `final/`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from rlhf.algorithms import distinct_n, logprobs_from_logits, truncate_after_eos
from rlhf.algorithms.collapse import collapse_reasons, kl_limit, repeat_share
from rlhf.config import ConfigError, EvalConfig, ModelConfig, check_paths, save_config
from rlhf.data.batching import length_batches, pad
from rlhf.data.encoding import TruncationReport, encode_prompts, encode_text, response_sequences
from rlhf.data.sources import load_source
from rlhf.generation.sampling import decode_responses, episode_seed, generate
from rlhf.models.forwards import causal_logits, summed_lm_loss
from rlhf.models.heads import score_sequences
from rlhf.models.loading import load_causal_lm, load_reward_ensemble, load_tokenizer, reward_members
from rlhf.models.shared_prompt import shared_prefill
from rlhf.rewards import row_function
from rlhf.runtime.checkpoints import checkpoint_dirs
from rlhf.runtime.devices import inference_device, is_main_process
from rlhf.runtime.seeds import seed_everything
from rlhf.runtime.tracking import ProgressBar, write_json

EVAL_SAMPLE_STREAM = 2  # the key of rlhf eval's per-prompt seeds (PPO's rollouts and held-out prompts use 0 and 1)


def sample(model, tokenizer, prompts: list[list[int]], cfg: EvalConfig, desc: str) -> list[list[int]]:
    """Response token ids (through EOS when it ended) for every prompt, in order. Prompt i is sampled from its own
    random stream (eval seed, i): every model gets the same noise on it (a paired comparison), whatever the
    batching; batches hold prompts of like length (less left padding), and a prompt's samples_per_prompt copies,
    side by side in them, are prefilled once (`shared_prefill`)."""
    out: list[list[int]] = [[] for _ in prompts]
    bar = ProgressBar(len(prompts), desc, "auto")
    for chunk in length_batches([len(p) for p in prompts], cfg.batch_size):
        seeds = [episode_seed(cfg.seed, EVAL_SAMPLE_STREAM, i) for i in chunk]
        _, _, resp = generate(
            model,
            tokenizer,
            [prompts[i] for i in chunk],
            cfg.max_new_tokens,
            cfg.temperature,
            seeds=seeds,
            prefill=shared_prefill,
        )
        _, mask = truncate_after_eos(resp, tokenizer.eos_token_id, tokenizer.pad_token_id)
        for i, r, m in zip(chunk, resp, mask):
            out[i] = r[m].tolist()
        bar.update(len(chunk))
    bar.close()
    return out


@torch.no_grad()
def sequence_logprobs(model, prompts, responses, pad_id: int, temperature: float, batch: int) -> list[torch.Tensor]:
    """Per-token log-probs of each response given its prompt (a list of [R_i] tensors), in order; computed in
    batches of like length."""
    out: list[torch.Tensor] = [torch.zeros(0)] * len(prompts)
    device = next(model.parameters()).device
    for chunk in length_batches([len(p) + len(r) for p, r in zip(prompts, responses)], batch):
        seqs = [prompts[i] + responses[i] for i in chunk]
        ids, mask = pad(seqs, pad_id).to(device), pad([[1] * len(x) for x in seqs], 0).to(device)
        logits = causal_logits(model, ids, mask)
        lp = logprobs_from_logits(logits[:, :-1], ids[:, 1:], temperature)
        for row, i in enumerate(chunk):
            start = len(prompts[i]) - 1
            out[i] = lp[row, start : start + len(responses[i])].cpu()
    return out


class Evaluation:
    """The fixed parts of an evaluation (prompts, SFT baseline, judge, reward models); `measure` rates one model."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.judge = row_function(cfg.judge, "judge") if cfg.judge else None
        self.tokenizer = tok = load_tokenizer(cfg.sft, cfg.trust_remote_code, cfg.format)
        ds = load_source(cfg.prompts, "prompts", max_rows=cfg.num_prompts or None)
        self.rows = [r for r in ds.to_list() for _ in range(cfg.samples_per_prompt)]
        self.truncation = TruncationReport()
        self.prompts = encode_prompts(
            tok, cfg.format, self.rows, self.truncation, source=cfg.prompts.path, key="format.max_prompt_length"
        )
        print(
            f"[eval] {len(ds)} prompts x {cfg.samples_per_prompt} samples; "
            f"{self.truncation.prompts_cut // cfg.samples_per_prompt} cut to format.max_prompt_length",
            flush=True,
        )
        self.device = inference_device()
        self.sft = self.load_policy(cfg.sft, "sft")
        self.rm_tokenizer, self.reward_models, self.proxy_models = None, [], []
        proxy_paths = [cfg.proxy_reward_model] if cfg.proxy_reward_model else []
        if cfg.reward_model:
            self.rm_tokenizer = load_tokenizer(cfg.reward_model, cfg.trust_remote_code, cfg.format)
            self.reward_models = self.load_rms(cfg.reward_model, "reward_model")
            proxy_paths = proxy_paths or reward_members(cfg.reward_model, holdout=True)
        for path in proxy_paths:
            self.rm_tokenizer = self.rm_tokenizer or load_tokenizer(path, cfg.trust_remote_code, cfg.format)
            self.proxy_models += self.load_rms(path, "proxy_reward_model")
        if cfg.select_best and not self.proxy_models:
            raise ConfigError(
                "select_best needs a held-out proxy score: set proxy_reward_model, or train the reward model with "
                "ensemble.holdout >= 1 so reward_model's ensemble has a member PPO never optimised"
            )

    def load_policy(self, path: str, key: str = "policy"):
        model_cfg = ModelConfig(name_or_path=path, trust_remote_code=self.cfg.trust_remote_code)
        return load_causal_lm(model_cfg, self.tokenizer, dropout=False, key=key).eval().to(self.device)

    def load_rms(self, path: str, key: str) -> list:
        model_cfg = ModelConfig(name_or_path=path, trust_remote_code=self.cfg.trust_remote_code)
        return [rm.to(self.device) for rm in load_reward_ensemble(model_cfg, self.rm_tokenizer, key)]

    def rm_mean(self, models: list, sequences: list[list[int]]) -> list[float]:
        """Mean normalised score over `models` of each sequence."""
        cfg, pad_id = self.cfg, self.rm_tokenizer.pad_token_id
        scores = [score_sequences(m, sequences, cfg.batch_size, pad_id, self.device, normalized=True) for m in models]
        return (sum(scores) / len(scores)).tolist()

    def measure(self, model, name: str) -> tuple[dict, dict, list[str]]:
        """Sample `model` on every prompt; returns (metrics, per-sample scores {gold, rm, proxy}, texts).

        Metrics: length, eos_share, distinct1/2, repeat_share (rlhf.algorithms.collapse), sft_logprob (the SFT model's
        log-likelihood per token of the samples), kl_to_sft (per sequence, on the model's own samples), rm_score,
        proxy_score, gold_score.
        """
        cfg, tok, eos = self.cfg, self.tokenizer, self.tokenizer.eos_token_id
        resp = sample(model, tok, self.prompts, cfg, f"eval {name}")
        texts = decode_responses(tok, pad([r or [tok.pad_token_id] for r in resp], tok.pad_token_id))
        content = [[t for t in r if t != eos] for r in resp]
        ended = [bool(r) and r[-1] == eos for r in resp]
        sft_lp = sequence_logprobs(self.sft, self.prompts, resp, tok.pad_token_id, 1.0, cfg.batch_size)
        tokens = sum(len(x) for x in sft_lp)
        metrics = {
            "length": sum(len(c) for c in content) / len(content),
            "eos_share": sum(ended) / len(resp),
            "distinct1": distinct_n(content, 1),
            "distinct2": distinct_n(content, 2),
            "repeat_share": repeat_share(content, cfg.collapse.max_ngram, cfg.collapse.repeat_times),
            "sft_logprob": float(sum(x.sum() for x in sft_lp) / max(tokens, 1)),
            "kl_to_sft": 0.0,
        }
        if model is not self.sft:
            # KL(model || SFT) per sequence on the model's own samples, at the sampling temperature
            own = sequence_logprobs(model, self.prompts, resp, tok.pad_token_id, cfg.temperature, cfg.batch_size)
            ref = (
                sft_lp
                if cfg.temperature == 1.0
                else sequence_logprobs(self.sft, self.prompts, resp, tok.pad_token_id, cfg.temperature, cfg.batch_size)
            )
            metrics["kl_to_sft"] = float(sum((a - b).sum() for a, b in zip(own, ref)) / len(resp))
        per_sample: dict[str, list[float]] = {}
        if self.reward_models or self.proxy_models:
            seqs = response_sequences(self.rm_tokenizer, cfg.format, self.rows, texts, ended)
            for key, models in (("rm", self.reward_models), ("proxy", self.proxy_models)):
                if models:
                    per_sample[key] = self.rm_mean(models, seqs)
                    metrics[f"{key}_score"] = sum(per_sample[key]) / len(seqs)
        if self.judge is not None:
            per_sample["gold"] = [self.judge(r, t) for r, t in zip(self.rows, texts)]
            metrics["gold_score"] = sum(per_sample["gold"]) / len(self.rows)
            k = cfg.samples_per_prompt
            if k > 1 and set(per_sample["gold"]) <= {0.0, 1.0}:
                # a 0/1 judge (a verifiable reward): gold_score is pass@1; pass@k counts a prompt any of whose k
                # samples passes
                per_prompt = [max(per_sample["gold"][i : i + k]) for i in range(0, len(self.rows), k)]
                metrics["gold_pass_at_k"] = sum(per_prompt) / len(per_prompt)
        return metrics, per_sample, texts

    def win_rate(self, mine: dict, sft: dict) -> dict:
        """Share of prompts where the model beats SFT (ties half), by the judge, else the proxy, else the RM."""
        key = next((k for k in ("gold", "proxy", "rm") if k in mine), None)
        if key is None:
            return {}
        a, b = mine[key], sft[key]
        rate = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)
        judged_by = {"gold": "judge", "proxy": "proxy_reward_model", "rm": "reward_model"}[key]
        return {"win_rate": rate, "win_rate_judged_by": judged_by}


def comparison(policy: tuple[dict, dict], sft: tuple[dict, dict], ev: Evaluation) -> dict:
    """eval.json's policy-vs-SFT view: every metric with a _policy / _sft suffix, the win-rate and kl_to_sft."""
    out: dict = {"num_samples": len(ev.prompts), "kl_to_sft": policy[0]["kl_to_sft"]}
    for name, (metrics, _) in (("sft", sft), ("policy", policy)):
        out |= {f"{k}_{name}": v for k, v in metrics.items() if k != "kl_to_sft"}
    return out | ev.win_rate(policy[1], sft[1])


def write_samples(path: Path, rows: list[dict], texts: dict[str, list[str]], per_sample: dict[str, dict]) -> None:
    with path.open("w") as f:
        for i, r in enumerate(rows):
            row = {"prompt": r["prompt"]} | {name: t[i] for name, t in texts.items()}
            for name, scores in per_sample.items():
                row |= {f"{k}_{name}": round(v[i], 4) for k, v in scores.items()}
            f.write(json.dumps(row) + "\n")


def _rounded(d: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def run(cfg: EvalConfig, source: str = "<config>") -> dict:
    """Evaluate; prints and returns the result dict and writes `<output_dir>/eval.json` and `samples.jsonl`.

    With `run_dir`, the frontier over the run's checkpoints comes first (`frontier.json`, `frontier.png`) and
    eval.json compares the selected policy (the best by proxy with select_best, else final/) with SFT.
    """
    check_paths(cfg, source)
    if not is_main_process():  # one process evaluates; the others would only sample and write the same rows again
        return {}
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    ev = Evaluation(cfg)
    sft_metrics, sft_scores, sft_texts = ev.measure(ev.sft, "sft")
    if cfg.run_dir:
        chosen, policy_metrics, policy_scores, policy_texts = frontier(cfg, ev, (sft_metrics, sft_scores))
        policy = ev.load_policy(str(chosen)) if cfg.pretrain_eval.path else None
    else:
        chosen, policy = cfg.policy, ev.load_policy(cfg.policy)
        policy_metrics, policy_scores, policy_texts = ev.measure(policy, "policy")
    result = comparison((policy_metrics, policy_scores), (sft_metrics, sft_scores), ev)
    result["policy"] = str(chosen)
    if cfg.pretrain_eval.path:
        ds = load_source(cfg.pretrain_eval, "text")
        examples = encode_text(ev.tokenizer, ds["text"], cfg.format.max_length, TruncationReport())
        examples.sort(key=lambda e: -len(e["input_ids"]))  # batches of like length: a sum, so order is free
        for name, model in (("sft", ev.sft), ("policy", policy)):
            loss_sum, tokens = summed_lm_loss(model, examples, cfg.batch_size, ev.tokenizer.pad_token_id, ev.device)
            result[f"pretrain_loss_{name}"] = loss_sum / max(tokens, 1)
    result = _rounded(result)
    write_samples(
        out_dir / "samples.jsonl",
        ev.rows,
        {"sft": sft_texts, "policy": policy_texts},
        {"sft": sft_scores, "policy": policy_scores},
    )
    write_json(out_dir / "eval.json", result)
    print(json.dumps(result, sort_keys=True))
    return result


# --------------------------------------------------------------------------------------------------
# The frontier: every checkpoint of a PPO run, score against KL
# --------------------------------------------------------------------------------------------------

PROMOTED_FILE = "promoted.json"


def run_policies(run_dir: Path) -> list[tuple[str, int | None, Path]]:
    """(name, iteration, policy dir) of every checkpoint and the final policy of a PPO run, in training order.

    After a promotion, final/ is a copy of a checkpoint and the last policy lives in final-last/."""
    found = [(c.name, int(c.name.split("-")[-1]), c / "policy") for c in checkpoint_dirs(run_dir)]
    found = [f for f in found if f[2].is_dir()]
    last = run_dir / ("final-last" if (run_dir / "final" / PROMOTED_FILE).exists() else "final")
    if last.is_dir():
        found.append((last.name, None, last))
    if not found:
        raise ConfigError(f"run_dir {run_dir} holds no checkpoint-*/policy and no final/: is it a PPO output dir?")
    return found


def frontier(cfg: EvalConfig, ev: Evaluation, sft: tuple[dict, dict]):
    """Measure every policy of cfg.run_dir; write frontier.json / frontier.png; returns the chosen one's results."""
    run_dir, out_dir = Path(cfg.run_dir), Path(cfg.output_dir)
    rows, measured = [], {}
    sft_row = {"name": "sft", "step": 0} | sft[0]
    for name, step, path in run_policies(run_dir):
        metrics, scores, texts = ev.measure(ev.load_policy(str(path), f"run_dir ({name})"), name)
        measured[name] = (path, metrics, scores, texts)
        rows.append({"name": name, "step": step, "path": str(path)} | metrics | ev.win_rate(scores, sft[1]))
    max_kl = kl_limit(cfg.collapse, run_kl_config(run_dir))
    for r in rows:
        r["collapse"] = collapse_reasons(r, sft_row, cfg.collapse, max_kl)
    best = select_best(rows) if ev.proxy_models else None
    report = {
        "run_dir": str(run_dir),
        "selected_by": "proxy_score" if ev.proxy_models else None,  # among the policies with no collapse flag
        "best": {k: best[k] for k in ("name", "step", "kl_to_sft", "proxy_score")} if best else None,
        "excluded": {r["name"]: r["collapse"] for r in rows if r["collapse"]},
        "max_kl": max_kl,
        "sft": _rounded(sft_row),
        "rows": [_rounded(r) for r in rows],
    }
    write_json(out_dir / "frontier.json", report)
    plot_frontier(report, out_dir / "frontier.png")
    for r in rows:
        gold = f" gold {r['gold_score']:.3f}" if "gold_score" in r else ""
        proxy = f" proxy {r['proxy_score']:+.3f}" if "proxy_score" in r else ""
        rm = f" rm {r['rm_score']:+.3f}" if "rm_score" in r else ""
        flag = "  COLLAPSED" if r["collapse"] else ""
        print(
            f"[frontier] {r['name']:<18} KL {r['kl_to_sft']:7.3f}{rm}{proxy}{gold} repeat {r['repeat_share']:.2f} "
            f"distinct-2 {r['distinct2']:.3f}{flag}",
            flush=True,
        )
    for name, reasons in report["excluded"].items():
        print(f"[frontier] {name} excluded from selection: {'; '.join(reasons)}", flush=True)
    if best:
        print(f"[frontier] best by proxy score: {best['name']} (KL {best['kl_to_sft']:.3f})", flush=True)
    elif ev.proxy_models:
        print("[frontier] every policy of the run is flagged as collapsed: none is selected", flush=True)
    chosen = rows[-1]["name"]
    if cfg.select_best and best is not None:
        chosen = best["name"]
        promote(run_dir, measured[chosen][0], best)
    path, metrics, scores, texts = measured[chosen]
    final = run_dir / "final"
    return (final if cfg.select_best and final.is_dir() else path), metrics, scores, texts


def select_best(rows: list[dict]) -> dict | None:
    """The row with the highest proxy score among those with no collapse flag (`row["collapse"]` empty); None when
    every row is flagged. Ties go to the earlier checkpoint (closer to SFT)."""
    candidates = [r for r in rows if not r.get("collapse")]
    return max(candidates, key=lambda r: r["proxy_score"]) if candidates else None


def run_kl_config(run_dir: Path) -> dict:
    """The `kl` section of the PPO run's resolved config.yaml ({} when the run dir has none)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("kl", {}) or {}


def promote(run_dir: Path, policy_dir: Path, best: dict) -> Path:
    """Make `policy_dir` the run's final/ (the last policy moves to final-last/); the rename is the commit point.

    Idempotent: promoting again replaces final/ from the same (or another) checkpoint, never the last policy."""
    final, last = run_dir / "final", run_dir / "final-last"
    if policy_dir.resolve() in (final.resolve(), last.resolve()) and not (final / PROMOTED_FILE).exists():
        print(f"[frontier] the best policy is the last one: {final} stays as it is")
        return final
    tmp = run_dir / "final.promote.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(policy_dir, tmp)
    write_json(tmp / PROMOTED_FILE, {"from": best["name"], "step": best["step"], "selected_by": "proxy_score"})
    if not (final / PROMOTED_FILE).exists() and final.is_dir():
        shutil.rmtree(last, ignore_errors=True)
        final.rename(last)
    else:
        shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    print(f"[frontier] promoted {policy_dir} to {final} (the last policy is in {last})", flush=True)
    return final


def plot_frontier(report: dict, path: Path) -> Path | None:
    """Score vs KL to SFT for every checkpoint (the over-optimisation curve); None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("[frontier] matplotlib is not installed (pip install rlhf[plot]): no frontier.png")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [report["sft"]] + report["rows"]
    last_step = max([r["step"] for r in rows if r["step"] is not None] + [0])
    steps = [last_step + 1 if r["step"] is None else r["step"] for r in rows]  # final/ after the last checkpoint
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), dpi=110)
    for ax, xs, xlabel in (
        (axes[0], [r["kl_to_sft"] for r in rows], "KL to SFT (nats / sequence)"),
        (axes[1], steps, "PPO iteration (SFT at 0, final last)"),
    ):
        for key, label in (("rm_score", "RM score (optimised)"), ("proxy_score", "held-out proxy RM")):
            if all(key in r for r in rows):
                ax.plot(xs, [r[key] for r in rows], marker="o", markersize=3, label=label)
                flagged = [(x, r[key]) for x, r in zip(xs, rows) if r.get("collapse")]
                if flagged and key == "proxy_score":
                    ax.scatter(*zip(*flagged), marker="x", color="red", s=60, zorder=5, label="collapse flag")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("reward-model score")
        if all("gold_score" in r for r in rows):
            gold_ax = ax.twinx()
            gold_ax.plot(xs, [r["gold_score"] for r in rows], color="black", marker="s", markersize=3, label="gold")
            gold_ax.set_ylabel("gold score")
        ax.grid(alpha=0.3)
    if report["best"]:
        axes[0].axvline(
            report["best"]["kl_to_sft"], color="green", linestyle="--", label=f"best: {report['best']['name']}"
        )
    sft = report["sft"]
    ratios = (
        ("distinct2", "distinct-2 / SFT's", "tab:purple"),
        ("length", "length / SFT's", "tab:brown"),
        ("eos_share", "EOS / SFT's", "tab:olive"),
    )
    for key, label, color in ratios:
        if sft.get(key):
            ys = [r.get(key, 0.0) / sft[key] for r in rows]
            axes[2].plot(steps, ys, marker="o", markersize=3, color=color, label=label)
    repeats = [r.get("repeat_share", 0.0) for r in rows]
    axes[2].plot(steps, repeats, marker="o", markersize=3, color="tab:red", label="repeat share")
    for x, r in zip(steps, rows):
        if r.get("collapse"):
            axes[2].axvline(x, color="red", alpha=0.25)
    axes[2].set_xlabel("PPO iteration (SFT at 0, final last; red = flagged)")
    axes[2].set_title("collapse signs")
    axes[2].grid(alpha=0.3)
    axes[0].set_title("score against KL (the over-optimisation curve)")
    axes[1].set_title("score over training")
    handles = [h for ax in fig.axes for h in ax.get_legend_handles_labels()[0]]
    labels = [lab for ax in fig.axes for lab in ax.get_legend_handles_labels()[1]]
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path
