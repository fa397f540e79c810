"""Supervised fine-tuning data: records (read and rendered by :mod:`compressed_experts.text`)
tokenized with their labels, and packed.

Every record is a list of (text, is_response) segments (:func:`compressed_experts.text.segments`),
so that "loss on response tokens only" is a label mask. Packing concatenates the tokenized
records and cuts fixed-length blocks, as the paper's recipe does; ``datasets`` does the work so
large sets stream through in batches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import CompressedExpertsError
from ..text import check_prompt_format, segments

__all__ = ["IGNORE", "build_dataset", "data_fingerprint", "tokenize", "tokenizer_fingerprint"]

IGNORE = -100  # label of tokens that do not count in the loss


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


def data_fingerprint(source: str, records) -> str:
    """What a resumption compares to be sure it trains on the same data: the SHA-256 of a local
    file's bytes (read in 1 MiB chunks), or the ``datasets`` fingerprint of a hub dataset (which
    follows the dataset's revision and files, as ``datasets`` caches them)."""
    path = Path(source)
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"
    return f"datasets:{records._fingerprint}"


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what turns the data into tokens: the tokenizer's full definition (vocabulary,
    merges, normalizer...), its chat template and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        [
            getattr(tokenizer, "chat_template", None),
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        ]
    )
    return "sha256:" + hashlib.sha256((definition + extra).encode()).hexdigest()


def build_dataset(
    records, tokenizer, seq_len: int, prompt_format: str = "alpaca", packing: bool = True, response_only: bool = False
):
    """Tokenized training examples: fixed ``seq_len`` blocks when packing, else one truncated
    example per record (padded per batch by the collator)."""
    check_prompt_format(prompt_format, tokenizer)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out = [
            tokenize(segments(row, tokenizer, prompt_format), tokenizer, response_only, prompt_format) for row in rows
        ]
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
                "input_ids": [ids[i : i + seq_len] for i in range(0, cut, seq_len)],
                "labels": [labels[i : i + seq_len] for i in range(0, cut, seq_len)],
            }

        examples = encoded.map(pack, batched=True, batch_size=1000, desc="packing")
        if len(examples) == 0:
            total = sum(len(row) for row in encoded["input_ids"])
            raise CompressedExpertsError(
                f"the data holds {total} tokens, fewer than one packed sequence of {seq_len}: "
                f"lower seq_len, add data, or turn packing off",
                settings=("seq_len", "packing"),
            )
    # A sequence with no token in the loss (a prompt cut off before its response) would make
    # a batch's mean loss 0/0; such sequences teach nothing and are left out.
    examples = examples.filter(lambda row: any(label != IGNORE for label in row["labels"]), desc="dropping loss-free")
    if len(examples) == 0:
        raise CompressedExpertsError(
            "no sequence has a token in the loss: are the responses empty, or cut off by a short seq_len?",
            settings=("seq_len",),
        )
    return examples
