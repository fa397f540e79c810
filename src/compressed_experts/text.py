"""Text records, however they are laid out, as text: loading, prompt rendering and packing.

Records come from a Hugging Face dataset or a local JSON/JSONL/Parquet file, in one of three
layouts: ``instruction`` (+ optional ``input``) with ``output`` or ``response`` (MathInstruct,
Magicoder-Evol-Instruct, Alpaca), chat ``messages`` (Tulu 3), or plain ``text`` (language
modelling, e.g. the bundled model's pretraining corpus: every token counts). Every record becomes a list
of (text, is_response) segments in a prompt format (the paper's Alpaca template or the
tokenizer's chat template), so that fine-tuning (:mod:`.training.data`) can mask prompts out of
the loss, and calibration (:mod:`.fit`) and scoring can read any layout as plain text;
:func:`token_blocks` packs texts into fixed-length blocks of tokens.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

import torch

from .errors import CompressedExpertsError, first_line

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


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt for one instruction, up to and including ``### Response:\\n``."""
    if input_text:
        return f"{ALPACA_PREAMBLE_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"{ALPACA_PREAMBLE}### Instruction:\n{instruction}\n\n### Response:\n"


def check_text_file(path: str | Path, source: str | None = None) -> None:
    """Refuse a file that is not UTF-8 text: a binary file (a NUL byte), or text in another
    encoding, naming the first offending byte. Read in chunks: memory stays small for big files."""
    path, source = Path(path), source or str(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise CompressedExpertsError(
                    f"{source} is not a text file: it holds a NUL byte at offset {offset + nul} "
                    f"(a binary file?); give UTF-8 text"
                )
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                at = offset - pending + err.start
                raise CompressedExpertsError(
                    f"{source} is not UTF-8 text: the byte at offset {at} cannot be decoded (a binary file, or "
                    f"another encoding: convert it, e.g. with iconv -t utf-8)"
                ) from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise CompressedExpertsError(
                f"{source} is not UTF-8 text: it ends inside a character (cut off, or another encoding)"
            ) from None


def read_text_file(path: str | Path, source: str | None = None) -> str:
    """The text of a UTF-8 file; a binary or otherwise undecodable file is refused (:func:`check_text_file`)
    rather than read as replacement characters."""
    check_text_file(path, source)
    return Path(path).read_text(encoding="utf-8")


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
        if builder == "json":  # JSON is UTF-8 text: a binary file is named as one, not a parser's riddle
            check_text_file(path, source)
        try:
            records = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # datasets raises many types for a malformed file
            raise CompressedExpertsError(f"cannot read {source}: {first_line(err)}") from err
    else:
        if path.suffix.lower() in _LOCAL_BUILDERS:
            raise CompressedExpertsError(f"no such data file: {source}")
        try:
            records = datasets.load_dataset(source, split=split)
        except Exception as err:  # offline, unknown name, gated dataset...
            raise CompressedExpertsError(
                f"cannot load the dataset {source!r} (split {split!r}): {first_line(err)}. "
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
            raise CompressedExpertsError(
                "this tokenizer's chat template does not extend turn by turn; use prompt alpaca", settings=("prompt",)
            )
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return pieces


def check_prompt_format(prompt_format: str, tokenizer) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise CompressedExpertsError(
            f"unknown prompt format {prompt_format!r}; choose from {', '.join(PROMPT_FORMATS)}"
        )
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise CompressedExpertsError(
            "the tokenizer has no chat template; use prompt alpaca (the paper's format)", settings=("prompt",)
        )


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
            f"the texts hold {len(ids)} tokens, fewer than one block of {seq_len}: give more text or a shorter seq_len",
            settings=("seq_len",),
        )
    return torch.tensor(ids[: usable * seq_len]).view(usable, seq_len)
