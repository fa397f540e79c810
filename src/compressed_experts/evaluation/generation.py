"""Batched generation: left-padded prompts, KV cache, greedy unless a temperature is given."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import CompressedExpertsError


def _token_ids(config_id: int | list[int] | None, fallback: int | None) -> list[int]:
    ids = config_id if config_id is not None else fallback
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask with every sequence right-aligned, so that all rows of a
    batch generate their next token at the same position."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first stop string in it."""
    cut = min((at for s in stop if (at := text.find(s)) >= 0), default=len(text))
    return text[:cut]


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    progress: bool | str = True,
    add_special_tokens: bool = True,
) -> list[str]:
    """The model's continuation of each prompt (without the prompt), cut at the first ``stop`` string.

    Prompts are sorted by length so that a batch holds prompts of similar length (less padding,
    and the longest batch comes first, so running out of memory happens at once); outputs come
    back in the order of ``prompts``. ``temperature`` 0 is greedy decoding. ``progress`` shows a
    progress bar (a string is its label). ``add_special_tokens`` False leaves out the tokenizer's
    own BOS, for prompts whose template writes its own (chat), as training tokenized them.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise CompressedExpertsError(
            f"batch size and max new tokens must be at least 1, not {batch_size} and {max_new_tokens}"
        )
    eos = _token_ids(model.generation_config.eos_token_id, tokenizer.eos_token_id)
    pad = _token_ids(tokenizer.pad_token_id, eos[0] if eos else None)
    if not pad:
        raise CompressedExpertsError("the tokenizer has no padding or end-of-sequence token: set tokenizer.pad_token")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature or None,
        top_k=None,
        top_p=None,
        pad_token_id=pad[0],
        eos_token_id=eos or None,
        stop_strings=list(stop) or None,
    )
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    device = model.device
    label = progress if isinstance(progress, str) else "generating"
    with tqdm(total=len(prompts), desc=label, unit="example", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = left_pad([encoded[i] for i in rows], pad[0])
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config, tokenizer=tokenizer
            )
            texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(rows, texts):
                outputs[i] = truncate_at_stop(text, stop)
            bar.update(len(rows))
    return outputs
