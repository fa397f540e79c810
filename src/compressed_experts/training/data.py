"""Supervised fine-tuning data: load records, render prompts, tokenize, pack.

Records come from a Hugging Face dataset or a local JSON/JSONL/Parquet file, in one of three
layouts: ``instruction`` (+ optional ``input``) with ``output`` or ``response`` (MathInstruct,
Magicoder-Evol-Instruct, Alpaca), chat ``messages`` (Tulu 3), or plain ``text`` (language
modelling, e.g. the bundled model's pretraining corpus: every token counts). Every record becomes a list
of (text, is_response) segments, so that "loss on response tokens only" is a label mask and
the prompt format (the paper's Alpaca template or the tokenizer's chat template) is one
function. Packing concatenates the tokenized records and cuts fixed-length blocks, as the
paper's recipe does; ``datasets`` does the work so large sets stream through in batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CompressedExpertsError

#: The paper's prompt format (Alpaca). The evaluation prompts of fine-tuned models use the same text.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
PROMPT_FORMATS = ("alpaca", "chat")
_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_RESPONSE_FIELDS = ("output", "response")
IGNORE = -100  # label of tokens that do not count in the loss


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt for one instruction, up to and including ``### Response:\\n``."""
    if input_text:
        return f"{ALPACA_PREAMBLE_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"{ALPACA_PREAMBLE}### Instruction:\n{instruction}\n\n### Response:\n"


def load_records(source: str, split: str = "train", limit: int | None = None):
    """A ``datasets.Dataset`` of raw records from a local file or a hub dataset, checked for layout.

    Raises before any tokenization: a file of an unknown type, a dataset that cannot be
    reached, an empty one, or one without the fields a layout needs (naming those it has).
    """
    import datasets

    path = Path(source)
    if path.exists():
        builder = _LOCAL_BUILDERS.get(path.suffix.lower())
        if path.is_dir() or builder is None:
            raise CompressedExpertsError(
                f"{source}: give a .json, .jsonl or .parquet file (or a Hugging Face dataset name)"
            )
        if path.stat().st_size == 0:
            raise CompressedExpertsError(f"{source} holds no records (the file is empty)")
        try:
            records = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # datasets raises many types for a malformed file
            raise CompressedExpertsError(f"cannot read {source}: {_first_line(err)}") from err
    else:
        if path.suffix.lower() in _LOCAL_BUILDERS:
            raise CompressedExpertsError(f"no such data file: {source}")
        try:
            records = datasets.load_dataset(source, split=split)
        except Exception as err:  # offline, unknown name, gated dataset...
            raise CompressedExpertsError(
                f"cannot load the dataset {source!r} (split {split!r}): {_first_line(err)}. "
                f"Without network, give a local .json/.jsonl/.parquet file instead"
            ) from err
    if len(records) == 0:
        raise CompressedExpertsError(f"{source} holds no records")
    layout(records.column_names, source)
    if limit is not None:
        records = records.select(range(min(limit, len(records))))
    return records


def layout(fields: list[str], source: str) -> str:
    """``"messages"``, ``"instruction"`` or ``"text"``: which layout the fields carry, or an error naming them."""
    if "messages" in fields:
        return "messages"
    if "instruction" in fields and any(f in fields for f in _RESPONSE_FIELDS):
        return "instruction"
    if "text" in fields:
        return "text"
    raise CompressedExpertsError(
        f"{source} has the fields {', '.join(fields) or '(none)'}; expected instruction (+ optional input) "
        f"with output or response, chat messages, or text"
    )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _response(record: dict[str, Any]) -> str:
    response = next((record[f] for f in _RESPONSE_FIELDS if isinstance(record.get(f), str)), None)
    if response is None or not isinstance(record.get("instruction"), str):
        raise CompressedExpertsError(f"a record lacks its instruction or output/response text: {_show(record)}")
    return response


def _messages(record: dict[str, Any]) -> list[dict[str, str]]:
    messages = record["messages"]
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise CompressedExpertsError(f"a record's messages are not a list of {{role, content}} texts: {_show(record)}")
    return messages


def _show(record: dict[str, Any]) -> str:
    text = repr({k: v for k, v in record.items() if v is not None})
    return text if len(text) < 200 else text[:200] + "..."


def _as_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    if record.get("messages") is not None:
        return _messages(record)
    instruction = record["instruction"]
    if record.get("input"):
        instruction = f"{instruction}\n\n{record['input']}"
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": _response(record)}]


def segments(record: dict[str, Any], tokenizer, prompt_format: str) -> list[tuple[str, bool]]:
    """One record as (text, is_response) pieces in the chosen prompt format (plain text: one response piece)."""
    if "instruction" not in record and "messages" not in record:
        if not isinstance(record.get("text"), str):
            raise CompressedExpertsError(f"a record has no text: {_show(record)}")
        return [(record["text"], True)]
    if prompt_format == "chat":
        return _chat_segments(_as_messages(record), tokenizer)
    if record.get("messages") is None:
        response = _response(record)
        return [(alpaca_prompt(record["instruction"], record.get("input") or ""), False), (response, True)]
    # Chat records under the Alpaca template: each user turn is an instruction, each
    # assistant turn its response; a system message is put before the first instruction.
    pieces, system = [], ""
    for message in _messages(record):
        role, content = message["role"], message["content"]
        if role == "system":
            system = f"{content}\n\n"
        elif role == "user":
            pieces.append((alpaca_prompt(system + content), False))
            system = ""
        elif role == "assistant" and pieces:
            pieces.append((content, True))
    return pieces


def _chat_segments(messages: list[dict[str, str]], tokenizer) -> list[tuple[str, bool]]:
    """Render with the tokenizer's chat template; each assistant turn's text is what the template
    adds between the conversation up to its prompt and the conversation including it."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise CompressedExpertsError("this tokenizer's chat template does not extend turn by turn; use --prompt alpaca")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces


def check_prompt_format(prompt_format: str, tokenizer) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise CompressedExpertsError(f"unknown prompt format {prompt_format!r}; choose from {', '.join(PROMPT_FORMATS)}")
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise CompressedExpertsError("the tokenizer has no chat template; use --prompt alpaca (the paper's format)")


def tokenize(segs: list[tuple[str, bool]], tokenizer, response_only: bool, prompt_format: str) -> dict[str, list[int]]:
    """Token ids and labels of one record: a BOS first where the tokenizer uses one, an EOS after
    each Alpaca response, and prompt tokens masked out of the loss when ``response_only``."""
    ids: list[int] = []
    labels: list[int] = []
    if prompt_format == "alpaca" and tokenizer.bos_token_id is not None and _adds_bos(tokenizer):
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)
    for text, is_response in segs:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if is_response and prompt_format == "alpaca" and tokenizer.eos_token_id is not None:
            piece = piece + [tokenizer.eos_token_id]
        ids += piece
        labels += piece if (is_response or not response_only) else [IGNORE] * len(piece)
    return {"input_ids": ids, "labels": labels}


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token first by itself (Llama-style ones do, GPT-style ones do not)."""
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def build_dataset(records, tokenizer, seq_len: int, prompt_format: str = "alpaca",
                  packing: bool = True, response_only: bool = False):
    """Tokenized training examples: fixed ``seq_len`` blocks when packing, else one truncated
    example per record (padded per batch by the collator)."""
    check_prompt_format(prompt_format, tokenizer)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out = [tokenize(segments(row, tokenizer, prompt_format), tokenizer, response_only, prompt_format) for row in rows]
        return {"input_ids": [o["input_ids"] for o in out], "labels": [o["labels"] for o in out]}

    encoded = records.map(encode, batched=True, remove_columns=records.column_names, desc="tokenizing")
    if not packing:
        examples = encoded.map(lambda row: {k: v[:seq_len] for k, v in row.items()}, desc="truncating")
    else:
        def pack(batch: dict[str, list]) -> dict[str, list]:
            # Blocks are cut within each map batch; the last partial block of a batch is dropped.
            ids = [t for row in batch["input_ids"] for t in row]
            labels = [t for row in batch["labels"] for t in row]
            cut = len(ids) - len(ids) % seq_len
            return {
                "input_ids": [ids[i:i + seq_len] for i in range(0, cut, seq_len)],
                "labels": [labels[i:i + seq_len] for i in range(0, cut, seq_len)],
            }

        examples = encoded.map(pack, batched=True, batch_size=1000, desc="packing")
        if len(examples) == 0:
            total = sum(len(row) for row in encoded["input_ids"])
            raise CompressedExpertsError(
                f"the data holds {total} tokens, fewer than one packed sequence of {seq_len}: "
                f"lower --seq-len, add data, or turn packing off (--no-packing)"
            )
    # A sequence with no token in the loss (a prompt cut off before its response) would make
    # a batch's mean loss 0/0; such sequences teach nothing and are left out.
    examples = examples.filter(lambda row: any(label != IGNORE for label in row["labels"]), desc="dropping loss-free")
    if len(examples) == 0:
        raise CompressedExpertsError(
            "no sequence has a token in the loss: are the responses empty, or cut off by a short --seq-len?"
        )
    return examples


def token_blocks(tokenizer, texts, seq_len: int, blocks: int | None = None) -> torch.Tensor:
    """The texts' tokens packed into ``[n, seq_len]`` blocks (EOS between texts), at most ``blocks`` of them.

    For scoring and calibration, where every token counts the same and no prompt format applies.
    """
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if blocks is not None and len(ids) >= blocks * seq_len:
            break
    usable = len(ids) // seq_len if blocks is None else min(blocks, len(ids) // seq_len)
    if usable == 0:
        raise CompressedExpertsError(
            f"the texts hold {len(ids)} tokens, fewer than one block of {seq_len}: give more text or a shorter sequence length"
        )
    return torch.tensor(ids[: usable * seq_len]).view(usable, seq_len)
