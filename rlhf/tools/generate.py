"""`rlhf generate --model DIR --prompt "..."`: a quick look at any checkpoint."""

from __future__ import annotations

import torch

from rlhf.config import ModelConfig
from rlhf.data.encoding import encode_prompts
from rlhf.data.sources import load_rows
from rlhf.generation.sampling import decode_responses, generate
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.runtime.devices import inference_device, is_main_process
from rlhf.tools.chat import run_format


def main(args) -> None:
    if not is_main_process():  # under a multi-process launcher, print each sample once
        return
    torch.manual_seed(args.seed)
    fmt = run_format(args.model, args.prompt_template)  # the model's run's format; --prompt-template overrides
    tokenizer = load_tokenizer(args.model, fmt=fmt)
    model = load_causal_lm(ModelConfig(name_or_path=args.model), tokenizer, dropout=False, key="--model").eval()
    model.to(inference_device())
    if args.prompts_file:
        ds, _ = load_rows(args.prompts_file, "prompts")
        rows = ds.to_list()
    else:
        rows = [{"prompt": p, "messages": []} for p in args.prompt]
    prompts = encode_prompts(tokenizer, fmt, rows)
    for s in range(0, len(prompts), 64):
        _, _, responses = generate(
            model, tokenizer, prompts[s : s + 64], args.max_new_tokens, args.temperature, do_sample=not args.greedy
        )
        for row, text in zip(rows[s : s + 64], decode_responses(tokenizer, responses)):
            print(f">>> {row['prompt']}\n{text}\n")
