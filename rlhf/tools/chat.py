"""`rlhf chat MODEL`: talk to a checkpoint turn by turn, in the prompt format its run trained it with.

Lines are read from stdin until EOF or `/exit`; `/reset` clears the conversation. Every turn renders the whole
conversation so far the way the stages render a multi-turn prompt (`rlhf.data.encoding.render_prompt`): the
tokenizer's chat template when it has one, else the run's plain template (the tiny world's "Human: {prompt}
Assistant:") with the earlier turns in front.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TextIO

import torch

from rlhf.config import FormatConfig, ModelConfig
from rlhf.data.encoding import render_prompt, uses_chat_template
from rlhf.generation.sampling import decode_responses, generate
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.runtime.devices import inference_device
from rlhf.runtime.model_card import find_run_config, prompt_format

COMMANDS = "/reset clears the conversation, /exit (or end of input) ends it"


def run_format(model_dir: str, prompt_template: str | None = None) -> FormatConfig:
    """The prompt format of the run that made `model_dir` (the `data.format` / `format` of the config saved with
    it), else the defaults; `prompt_template` overrides its plain template."""
    saved = prompt_format(find_run_config(model_dir) or {})
    known = {f.name for f in dataclasses.fields(FormatConfig)}
    fmt = FormatConfig(**{k: v for k, v in saved.items() if k in known})
    if prompt_template is not None:
        fmt.prompt_template = prompt_template
    return fmt


class Chat:
    """A conversation with one model: its history, rendered whole for every reply."""

    def __init__(self, model_dir: str, system: str = "", prompt_template: str | None = None):
        self.fmt = run_format(model_dir, prompt_template)
        self.tokenizer = load_tokenizer(model_dir, fmt=self.fmt)
        model_cfg = ModelConfig(name_or_path=model_dir)
        self.model = load_causal_lm(model_cfg, self.tokenizer, dropout=False, key="MODEL").eval()
        self.model.to(inference_device())
        self.system = system
        self.history: list[dict] = []
        self.chat_template = uses_chat_template(self.tokenizer, self.fmt)

    def describe(self) -> str:
        return "the tokenizer's chat template" if self.chat_template else repr(self.fmt.prompt_template)

    def prompt_ids(self, text: str, max_new_tokens: int) -> list[int]:
        """The conversation so far plus `text`, rendered and tokenized; cut from the left to what fits the model's
        positions alongside the reply (the latest turns matter most)."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        rendered = render_prompt(self.tokenizer, self.fmt, text, messages)
        ids = self.tokenizer(rendered, add_special_tokens=not self.chat_template)["input_ids"]
        positions = getattr(self.model.config, "max_position_embeddings", None)
        keep = max(1, positions - max_new_tokens) if positions else len(ids)
        return ids[-keep:]

    def reply(self, text: str, max_new_tokens: int, temperature: float, top_p: float, greedy: bool) -> str:
        ids = self.prompt_ids(text, max_new_tokens)
        with torch.no_grad():
            _, _, response = generate(
                self.model, self.tokenizer, [ids], max_new_tokens, temperature, top_p=top_p, do_sample=not greedy
            )
        answer = decode_responses(self.tokenizer, response)[0]
        if not self.chat_template:  # a plain-format model may go on to write the next user turn itself
            user_marker = self.fmt.prompt_template.split("{prompt}")[0].strip()
            if user_marker and user_marker in answer:
                answer = answer[: answer.index(user_marker)]
        answer = answer.strip()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer


def main(args, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Read turns from `stdin` (default sys.stdin) and write each reply as one block to `stdout`."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    torch.manual_seed(args.seed)
    chat = Chat(args.model, args.system or "", args.prompt_template)
    interactive = stdin.isatty()
    print(f"[chat] {args.model}, prompts rendered with {chat.describe()}; {COMMANDS}", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            chat.history = []
            print("[chat] conversation cleared", file=sys.stderr)
            continue
        if not text:
            continue
        answer = chat.reply(text, args.max_new_tokens, args.temperature, args.top_p, args.greedy)
        print(f"{'model> ' if interactive else ''}{answer}", file=stdout, flush=True)
    return 0
