"""Tokenize checked rows and pack them. Pure functions: no Ray, no model.

Loss masking: label -100 marks tokens that are not learned (prompt, template, padding). With the
chat template, each assistant turn is found by rendering the conversation up to that turn with and
without it; the difference is the answer span.

Packing (TRL's best-fit-decreasing `pack_dataset`) puts several examples into one row of exactly
`max_length` tokens. `position_ids` restart at 0 for every example, and the model sees no
`attention_mask`: transformers then builds a block-diagonal causal mask from the position ids
(sdpa/eager on CPU) or runs varlen flash-attention (GPU), so no token attends across a boundary.
The first token of every example gets label -100, so no example is trained to predict its
neighbour's first token.
"""

from __future__ import annotations

from typing import Any

# The chat template belongs to the tokenizer (models/); re-exported here, where rows are rendered with it.
from ftray.models.load import DEFAULT_CHAT_TEMPLATE, ensure_chat_template

IGNORE = -100

__all__ = ["DEFAULT_CHAT_TEMPLATE", "IGNORE", "encode_row", "ensure_chat_template", "pack_examples", "render_prompt"]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _encode_messages(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        context = _ids(tokenizer, prompt[len(rendered) :])
        answer = _ids(tokenizer, full[len(prompt) :])
        ids += context + answer
        labels += [IGNORE] * len(context) + answer
        rendered = full
    return ids, labels


def encode_row(tokenizer, row: dict, max_length: int) -> list[dict[str, Any]]:
    """One checked row → examples {input_ids, labels, truncated}. Plain text longer than `max_length`
    is split into several examples (continued pretraining loses nothing); supervised rows are
    truncated, and dropped when no answer token survives."""
    if "text" in row:
        ids = _ids(tokenizer, row["text"]) + [tokenizer.eos_token_id]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        return [
            {"input_ids": ids[i : i + max_length], "labels": ids[i : i + max_length], "truncated": False}
            for i in range(0, len(ids), max_length)
            if len(ids[i : i + max_length]) > 1
        ]
    if "messages" in row:
        ids, labels = _encode_messages(tokenizer, row["messages"])
    else:
        context = _ids(tokenizer, row["prompt"])
        if tokenizer.bos_token_id is not None:
            context = [tokenizer.bos_token_id] + context
        answer = _ids(tokenizer, row["completion"]) + [tokenizer.eos_token_id]
        ids, labels = context + answer, [IGNORE] * len(context) + answer
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE for t in labels[1:]):
        return [{"input_ids": [], "labels": [], "truncated": True}]  # counted, then dropped
    return [{"input_ids": ids, "labels": labels, "truncated": truncated}]


def render_prompt(tokenizer, row: dict) -> tuple[str, str]:
    """(prompt text for generation, reference answer) of a supervised row, for exact-match evaluation."""
    if "messages" in row:
        msgs = row["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
        return prompt, msgs[last]["content"]
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else ""
    return bos + row["prompt"], row["completion"]


def pack_examples(examples: list[dict], max_length: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Pack examples into rows of exactly `max_length` tokens (TRL best-fit-decreasing)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    if not examples:
        return []
    ds = Dataset.from_dict(
        {"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]}
    )
    packed = pack_dataset(ds, seq_length=max_length, strategy="bfd")
    out = []
    for row in packed:
        ids, labels, lengths = list(row["input_ids"]), list(row["labels"]), list(row["seq_lengths"])
        pos: list[int] = []
        for n in lengths:
            labels[len(pos)] = IGNORE
            pos.extend(range(n))
        pad = max_length - len(ids)
        out.append(
            {
                "input_ids": ids + [pad_id] * pad,
                "labels": labels + [IGNORE] * pad,
                # Padding is its own segment (positions 0..pad-1) so it never joins the last example.
                "position_ids": pos + list(range(pad)),
                "tokens": len(ids),
            }
        )
    return out
