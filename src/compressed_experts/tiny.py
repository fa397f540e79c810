"""Tiny random-weight models of every supported family, for offline try-outs and tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from .architectures import family_by_name
from .config import check_dtype_name


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype | str | None = None) -> PreTrainedModel:
    """A freshly initialised, tiny causal LM of ``family`` (e.g. "olmoe"), same weights for the same seed.

    Weights start at a larger scale than transformers' default (std 0.1 instead of 0.02) so
    that routing weights are far from uniform and each expert visibly changes the logits:
    otherwise numerical checks at 1e-5 would pass against almost anything.
    """
    config = family_by_name(family).tiny_config()
    config.initializer_range = 0.1
    torch.manual_seed(seed)
    if isinstance(dtype, str):
        check_dtype_name(dtype)
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    # Built in ``dtype`` (not cast afterwards) so buffers such as rotary frequencies stay as a load makes them.
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer that fits the tiny models' 128-token vocabulary.

    Ids 0-3 are pad, bos, eos and unk (as the tiny configs declare); then newline, tab and
    the printable ASCII characters, one token each. Anything else becomes unk. It lets the
    training and evaluation pipelines run end to end offline on ``tiny:`` models.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in ["\n", "\t", *map(chr, range(32, 127))]:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
