"""Build the shared benchmark world for `make bench-peer`: tokenizer, random-init models, synthetic data.

Runs in rlhf's .venv (needs only transformers/tokenizers/torch). Everything is local (HF_HUB_OFFLINE=1) and
deterministic from the seed. Texts are space-separated words of a word-level vocabulary, so every token count is
exact on both sides. Two sizes (SIZES below), the same 568-word vocabulary:
  tiny   3.46M-parameter Llama (4 layers, d 256, 4 heads, MLP 688); a prompt is 32 tokens, a completion/response
         95 words + EOS, a whole sequence 128 tokens; PPO samples 32 new tokens
  small  ~25.9M-parameter Llama (8 layers, d 512, 8 heads, MLP 1376), 256-token context; a prompt is 64 tokens,
         a completion/response 191 words + EOS, a whole sequence 256 tokens; PPO samples 192 new tokens
The shape is written to <out>/model.json, which both workers read (lengths included).

Variable-length workloads (sftvar, rmvar, rmk4var; `*_var*.jsonl`): the same vocabulary, with each prompt's and each
completion's length drawn from a log-normal (VAR_LENGTHS: median a half of the prompt width and a quarter of the
completion width, sigma 0.7), clipped to [4, prompt_len] and [2, completion width]: for the tiny size a mean
sequence of ~50 of at most 128 tokens, the long tail of real chat and instruction data.

    python scripts/peer/world.py --out runs/bench-peer/world [--size tiny|small]
"""

import argparse
import json
import math
import random
from pathlib import Path

VOCAB = 568  # specials included
# model: LlamaConfig fields; prompt_len / seq_len (prompt + completion + EOS) for SFT and RM data; new_tokens: PPO's
# response length (prompt_len + new_tokens <= context)
SIZES = {
    "tiny": dict(
        model=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
        context=256,
        prompt_len=32,
        seq_len=128,
        new_tokens=32,
    ),
    "small": dict(
        model=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
        context=256,
        prompt_len=64,
        seq_len=256,
        new_tokens=192,
    ),
}


def build_tokenizer(out: Path):
    from rlhf.tiny import SPECIAL_TOKENS, word_level_tokenizer

    words = [f"w{i}" for i in range(VOCAB - len(SPECIAL_TOKENS))]
    return word_level_tokenizer(words, model_max_length=1024), words


def build_models(out: Path, tok, seed: int, size: dict) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=VOCAB,
        num_key_value_heads=size["model"]["num_attention_heads"],
        max_position_embeddings=size["context"],
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        attention_dropout=0.0,
        **size["model"],
    )
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(config)
    lm.save_pretrained(out / "lm")
    tok.save_pretrained(out / "lm")
    torch.manual_seed(seed + 1)
    rm_config = LlamaConfig(**config.to_dict())
    rm_config.num_labels = 1
    rm = LlamaForSequenceClassification(rm_config)
    rm.save_pretrained(out / "rm")
    tok.save_pretrained(out / "rm")
    n = sum(p.numel() for p in lm.parameters())
    shape = {k: v for k, v in size.items() if k != "model"}
    (out / "model.json").write_text(json.dumps({"params": n, "vocab": VOCAB, **size["model"], **shape}) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def build_data(out: Path, words: list[str], seed: int, rows: int, prompt_len: int, seq_len: int) -> None:
    """rlhf-format files (completion without a leading space: rlhf adds one) and TRL-format files (TRL
    concatenates prompt + completion as strings, so its completions carry the leading space)."""
    rng = random.Random(seed)
    completion_len = seq_len - prompt_len - 1  # + EOS

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    prompts = [text(prompt_len) for _ in range(rows)]
    write_jsonl(data / "prompts.jsonl", [{"prompt": p} for p in prompts])
    sft = [{"prompt": p, "completion": text(completion_len)} for p in prompts]
    write_jsonl(data / "sft.jsonl", sft)
    write_jsonl(data / "sft_trl.jsonl", [{"prompt": r["prompt"], "completion": " " + r["completion"]} for r in sft])
    ranked = [{"prompt": p, "ranked": [text(completion_len) for _ in range(4)]} for p in prompts]
    pairs = [{"prompt": r["prompt"], "chosen": r["ranked"][0], "rejected": r["ranked"][1]} for r in ranked]
    write_jsonl(data / "pairs.jsonl", pairs)
    write_jsonl(data / "ranked4.jsonl", ranked)
    pairs_trl = [{"prompt": p["prompt"], "chosen": " " + p["chosen"], "rejected": " " + p["rejected"]} for p in pairs]
    write_jsonl(data / "pairs_trl.jsonl", pairs_trl)
    # K=4 for TRL: the C(4,2) = 6 (better, worse) pairs of each prompt (48 pairs per step = 8 prompts' worth)
    k4 = []
    for r in ranked:
        for i in range(4):
            for j in range(i + 1, 4):
                k4.append({"prompt": r["prompt"], "chosen": " " + r["ranked"][i], "rejected": " " + r["ranked"][j]})
    write_jsonl(data / "ranked4_trl.jsonl", k4)


# log-normal length draws: (median as a share of the width, sigma, shortest)
VAR_LENGTHS = {"prompt": (0.5, 0.7, 4), "completion": (0.25, 0.7, 2)}


def var_length(rng: random.Random, kind: str, width: int) -> int:
    share, sigma, shortest = VAR_LENGTHS[kind]
    return max(shortest, min(width, round(rng.lognormvariate(math.log(share * width), sigma))))


def build_var_data(out: Path, words: list[str], seed: int, rows: int, prompt_len: int, seq_len: int) -> None:
    """The variable-length files, in both sides' layouts as build_data's (TRL's completions lead with a space)."""
    rng = random.Random(seed + 1)
    width = seq_len - prompt_len - 1  # + EOS

    def text(kind: str, w: int) -> str:
        return " ".join(rng.choice(words) for _ in range(var_length(rng, kind, w)))

    data = out / "data"
    sft = [{"prompt": text("prompt", prompt_len), "completion": text("completion", width)} for _ in range(rows)]
    write_jsonl(data / "prompts_var.jsonl", [{"prompt": r["prompt"]} for r in sft])
    write_jsonl(data / "sft_var.jsonl", sft)
    write_jsonl(
        data / "sft_var_trl.jsonl", [{"prompt": r["prompt"], "completion": " " + r["completion"]} for r in sft]
    )
    ranked = [{"prompt": r["prompt"], "ranked": [text("completion", width) for _ in range(4)]} for r in sft]
    pairs = [{"prompt": r["prompt"], "chosen": r["ranked"][0], "rejected": r["ranked"][1]} for r in ranked]
    write_jsonl(data / "pairs_var.jsonl", pairs)
    write_jsonl(data / "ranked4_var.jsonl", ranked)
    write_jsonl(
        data / "pairs_var_trl.jsonl",
        [{"prompt": p["prompt"], "chosen": " " + p["chosen"], "rejected": " " + p["rejected"]} for p in pairs],
    )
    k4 = [
        {"prompt": r["prompt"], "chosen": " " + r["ranked"][i], "rejected": " " + r["ranked"][j]}
        for r in ranked
        for i in range(4)
        for j in range(i + 1, 4)
    ]
    write_jsonl(data / "ranked4_var_trl.jsonl", k4)


def check(out: Path, prompt_len: int, seq_len: int) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "lm")
    row = json.loads((out / "data" / "sft_trl.jsonl").read_text().splitlines()[0])
    ids = tok(row["prompt"] + row["completion"] + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert len(ids) == seq_len and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids, len(ids)
    assert len(tok(row["prompt"])["input_ids"]) == prompt_len  # no BOS/EOS added on encode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = ap.parse_args()
    size = SIZES[args.size]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, words = build_tokenizer(out)
    build_models(out, tok, args.seed, {"size": args.size, **size})
    build_data(out, words, args.seed, args.rows, size["prompt_len"], size["seq_len"])
    build_var_data(out, words, args.seed, args.rows, size["prompt_len"], size["seq_len"])
    check(out, size["prompt_len"], size["seq_len"])
    print(json.loads((out / "model.json").read_text()))


if __name__ == "__main__":
    main()
