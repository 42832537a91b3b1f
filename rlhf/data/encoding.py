"""From canonical rows to token ids: prompt rendering, encoding of prompts, completions, conversations and text,
and the truncation policy.

One renderer serves SFT, RM, PPO and eval, so a prompt is formatted identically in every stage (N+ detail 4).
With a chat template (and `use_chat_template` auto/always) the prompt is the rendered conversation with the
generation prompt; otherwise it is `prompt_template.format(prompt=...)` and the completion follows after a
single space. Every completion ends with the tokenizer's EOS token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from rlhf.config import FormatConfig
from rlhf.data.sources import DataError


def uses_chat_template(tokenizer, fmt: FormatConfig) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if fmt.use_chat_template == "always" and not has:
        raise DataError("data.format.use_chat_template is 'always' but the tokenizer has no chat template")
    return has and fmt.use_chat_template != "never"


def render_prompt(tokenizer, fmt: FormatConfig, prompt: str, messages: list | None = None) -> str:
    """The text the model sees before its response (earlier chat turns included)."""
    messages = list(messages or [])
    if uses_chat_template(tokenizer, fmt):
        turns = messages + ([{"role": "user", "content": prompt}] if prompt else [])
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    history = ""
    for m in messages:
        if m["role"] == "user":
            history += fmt.prompt_template.format(prompt=m["content"]) + " "
        elif m["role"] == "assistant":
            history += m["content"] + " "
        else:  # system text leads the conversation
            history += m["content"] + " "
    return history + fmt.prompt_template.format(prompt=prompt) if prompt else history.rstrip()


def completion_text(tokenizer, fmt: FormatConfig, completion: str) -> str:
    return completion if uses_chat_template(tokenizer, fmt) else " " + completion


@dataclass
class TruncationReport:
    """What encoding did to a source's rows: counted while encoding, logged by `as_metrics`."""

    rows: int = 0
    prompts_cut: int = 0
    completions_cut: int = 0
    dropped: int = 0
    assistant_turns: int = 0  # chat rows trained on every assistant turn: the turns learnt
    turns_fallback: int = 0  # chat rows whose template could not be split: their last turn only

    def describe(self) -> str:
        """What truncation did, for a stage's start-up line."""
        return (
            f"{self.prompts_cut} prompts cut to max_prompt_length, {self.completions_cut} completions cut, "
            f"{self.dropped} rows dropped as too long"
        )

    def as_metrics(self, prefix: str) -> dict:
        return {
            f"{prefix}/rows": self.rows,
            f"{prefix}/prompts_truncated": self.prompts_cut,
            f"{prefix}/completions_truncated": self.completions_cut,
            f"{prefix}/dropped_too_long": self.dropped,
        }


def _tokenize(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    # verbose=False: no "sequence length is longer than the maximum ... indexing errors" warning. The caller cuts
    # every sequence to the config's limit (and reports it), so the model never sees one that long.
    out: list[list[int]] = []
    for start in range(0, len(texts), 1000):
        batch = texts[start : start + 1000]
        out.extend(tokenizer(batch, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])
    return out


def encode_prompts(
    tokenizer,
    fmt: FormatConfig,
    rows,
    report: TruncationReport | None = None,
    source: str | None = None,
    key: str = "data.format.max_prompt_length",
) -> list[list[int]]:
    """Rendered, tokenized prompts, cut from the left to max_prompt_length (the end of a prompt matters most).

    With `source` (the file the rows came from), a set in which most prompts would be cut is refused
    (`check_prompt_lengths`), naming `key`, the config key that sets the limit."""
    texts = [render_prompt(tokenizer, fmt, r["prompt"], r.get("messages")) for r in rows]
    ids = _tokenize(tokenizer, texts, add_special_tokens=not uses_chat_template(tokenizer, fmt))
    if source is not None:
        check_prompt_lengths([len(p) for p in ids], fmt.max_prompt_length, source, key)
    out = []
    for p in ids:
        if len(p) > fmt.max_prompt_length:
            p = p[-fmt.max_prompt_length :]
            if report is not None:
                report.prompts_cut += 1
        out.append(p)
    return out


def check_prompt_lengths(lengths: list[int], limit: int, source: str, key: str) -> None:
    """Refuse prompts of which more than half are longer than `limit` tokens: training or evaluating on the cut
    ends of most prompts is almost never what was meant. Names the key and the lengths' distribution."""
    cut = sum(n > limit for n in lengths)
    if not lengths or cut * 2 <= len(lengths):
        return
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    raise DataError(
        f"{source}: {cut} of {len(lengths)} prompts are longer than {key} = {limit} tokens (prompt lengths: min "
        f"{ordered[0]}, median {pct(0.5)}, 90th percentile {pct(0.9)}, max {ordered[-1]}) and would be cut from "
        f"the left. Raise {key} (and the length limits that include it) or shorten the prompts"
    )


def response_sequences(tokenizer, fmt: FormatConfig, rows, responses: list[str], ended: list[bool]) -> list[list[int]]:
    """(prompt row, response text) -> prompt + response ids, plus EOS where the response ended: how a reward model
    with its own tokenizer sees another model's samples (no truncation: scoring must see the whole sample)."""
    prompts = encode_prompts(tokenizer, fmt, rows)
    texts = [completion_text(tokenizer, fmt, r) for r in responses]
    completions = _tokenize(tokenizer, texts, add_special_tokens=False)
    return [p + c + ([tokenizer.eos_token_id] if e else []) for p, c, e in zip(prompts, completions, ended)]


def encode_pairs(
    tokenizer,
    fmt: FormatConfig,
    prompts: list[list[int]],
    completions: list[str],
    source: str,
    report: TruncationReport,
) -> list[tuple[list[int], list[int]] | None]:
    """(prompt ids, completion ids + EOS) per row; None for a row dropped by the truncation policy."""
    texts = [completion_text(tokenizer, fmt, c) for c in completions]
    comp_ids = _tokenize(tokenizer, texts, add_special_tokens=False)
    out: list = []
    for i, (p, c) in enumerate(zip(prompts, comp_ids)):
        c = c + [tokenizer.eos_token_id]
        report.rows += 1
        if len(p) + len(c) > fmt.max_length:
            if not cut_to_fit(len(p) + len(c), fmt, source, i, report):
                out.append(None)
                continue
            c = c[: max(0, fmt.max_length - len(p))]
        out.append((p, c))
    return out


def cut_to_fit(length: int, fmt: FormatConfig, source: str, index: int, report: TruncationReport, empty=False) -> bool:
    """data.format.truncation for row `index` of `length` > max_length tokens: raises DataError (error), or counts
    the row dropped and returns False (drop, or `empty`: nothing to learn would be left after the cut), or counts it
    cut and returns True (truncate: the caller cuts it)."""
    if fmt.truncation == "error":
        raise DataError(
            f"{source}: row {index} has {length} tokens > data.format.max_length {fmt.max_length}; raise max_length "
            "or set data.format.truncation to truncate or drop"
        )
    if fmt.truncation == "drop" or empty:
        report.dropped += 1
        return False
    report.completions_cut += 1
    return True


def encode_sft(
    tokenizer,
    fmt: FormatConfig,
    ds,
    source: str,
    mask_prompt: bool,
    report: TruncationReport,
    all_turns: bool = False,
):
    """SFT rows -> list of {input_ids, labels}; labels are -100 on the prompt when mask_prompt.

    all_turns (data.train_on: all_assistant_turns): a chat row rendered with a chat template learns every assistant
    turn of its conversation, each up to and including its turn-end token, in one sequence (`encode_conversation`);
    other rows, and a template whose rendering cannot be split (`assistant_spans`), learn the last turn only."""
    rows = ds.to_list()
    chat = all_turns and mask_prompt and uses_chat_template(tokenizer, fmt)
    multi = [i for i, r in enumerate(rows) if chat and any(m["role"] == "assistant" for m in r["messages"])]
    encoded = {i: encode_conversation(tokenizer, fmt, rows[i], source, i, report) for i in multi}
    single = [i for i in range(len(rows)) if encoded.get(i, False) is False]
    prompts = encode_prompts(tokenizer, fmt, [rows[i] for i in single], report)
    pairs = encode_pairs(tokenizer, fmt, prompts, [rows[i]["completion"] for i in single], source, report)
    for i, pair in zip(single, pairs):
        if pair is not None:
            p, c = pair
            encoded[i] = {"input_ids": p + c, "labels": ([-100] * len(p) if mask_prompt else list(p)) + c}
    return [encoded[i] for i in range(len(rows)) if encoded.get(i)]


def assistant_spans(tokenizer, conversation: list[dict]) -> tuple[str, list[tuple[int, int]]] | None:
    """(the template's rendering of a whole conversation, the character span [start, end) of each assistant turn:
    from where generation would start to its turn-end token), or None when the template cannot be split reliably:
    it renders earlier turns differently once later turns follow (e.g. drops reasoning from history), or a turn's
    content is not where the generation prompt leaves off."""
    render = functools.partial(tokenizer.apply_chat_template, tokenize=False)
    try:
        full, spans = render(conversation), []
        for i, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            before = render(conversation[:i], add_generation_prompt=True)
            through = render(conversation[: i + 1])
            content_at = through.find(message["content"], len(before))
            if not (full.startswith(through) and through.startswith(before)) or content_at < 0:
                return None
            end = content_at + len(message["content"])
            if tokenizer.eos_token and through.startswith(tokenizer.eos_token, end):
                end += len(tokenizer.eos_token)  # the turn-end token (EOS with a chat template: load_tokenizer)
            spans.append((len(before), end))
    except Exception:  # a template that cannot render a prefix of the conversation (jinja raises its own errors)
        return None
    return (full, spans) if spans else None


def encode_conversation(tokenizer, fmt: FormatConfig, row: dict, source: str, index: int, report: TruncationReport):
    """A chat row's whole conversation -> {input_ids, labels} with every assistant span labelled, cut after the last
    turn's end; None when the truncation policy drops it; False when the template cannot be split (counted in
    report.turns_fallback: the caller encodes the last turn only)."""
    conversation = row["messages"] + ([{"role": "user", "content": row["prompt"]}] if row["prompt"] else [])
    conversation = conversation + [{"role": "assistant", "content": row["completion"]}]
    found = assistant_spans(tokenizer, conversation) if tokenizer.is_fast else None
    if found is None:
        report.turns_fallback += 1
        return False
    text, spans = found
    encoding = tokenizer(text[: spans[-1][1]], add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    labels = [t if any(s <= a < e for s, e in spans) else -100 for t, (a, _) in zip(ids, offsets)]
    report.rows += 1
    report.assistant_turns += len(spans)
    if len(ids) > fmt.max_length:
        empty = all(x == -100 for x in labels[: fmt.max_length])
        if not cut_to_fit(len(ids), fmt, source, index, report, empty):
            return None
        ids, labels = ids[: fmt.max_length], labels[: fmt.max_length]
    return {"input_ids": ids, "labels": labels}


def encode_text(tokenizer, texts: list[str], max_length: int, report: TruncationReport) -> list[dict]:
    """Pretraining text -> {input_ids, labels} with EOS appended; a long document is split into chunks."""
    out = []
    for ids in _tokenize(tokenizer, texts, add_special_tokens=True):
        ids = ids + [tokenizer.eos_token_id]
        report.rows += 1
        if len(ids) > max_length:
            report.completions_cut += 1
        for start in range(0, len(ids), max_length):
            chunk = ids[start : start + max_length]
            if len(chunk) > 1:
                out.append({"input_ids": chunk, "labels": list(chunk)})
    return out
