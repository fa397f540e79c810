"""Training data: layouts, prompt formats, label masks and packing, against hand-written expectations."""

from __future__ import annotations

import json

import pytest

import compressed_experts as ce
from compressed_experts.text import alpaca_prompt, load_records, segments
from compressed_experts.training.data import IGNORE, build_dataset, tokenize

TOK = ce.tiny_tokenizer()
RECORD = {"instruction": "Add 2 and 3.", "output": "5"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_alpaca_template_is_the_papers():
    assert alpaca_prompt("Do it.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo it.\n\n### Response:\n"
    )
    assert "### Input:\nctx\n\n### Response:\n" in alpaca_prompt("Do it.", "ctx")
    assert "paired with an input" in alpaca_prompt("Do it.", "ctx")


@pytest.mark.parametrize("response_field", ["output", "response"])  # MathInstruct / Magicoder layouts
def test_instruction_layouts_give_prompt_then_response(response_field):
    record = {"instruction": "Add 2 and 3.", "input": "", response_field: "5"}
    assert segments(record, TOK, "alpaca") == [(alpaca_prompt("Add 2 and 3."), False), ("5", True)]


def test_response_only_masks_the_prompt_and_keeps_the_eos():
    encoded = tokenize(segments(RECORD, TOK, "alpaca"), TOK, response_only=True, prompt_format="alpaca")
    prompt_len = len(alpaca_prompt(RECORD["instruction"]))  # one token per character
    assert encoded["input_ids"] == TOK(alpaca_prompt(RECORD["instruction"]) + "5").input_ids + [TOK.eos_token_id]
    assert encoded["labels"] == [IGNORE] * prompt_len + [TOK.convert_tokens_to_ids("5"), TOK.eos_token_id]
    full = tokenize(segments(RECORD, TOK, "alpaca"), TOK, response_only=False, prompt_format="alpaca")
    assert full["labels"] == full["input_ids"]


def test_chat_messages_under_the_alpaca_template():
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Ciao"},
        ]
    }
    assert segments(record, TOK, "alpaca") == [
        (alpaca_prompt("Be brief.\n\nHi"), False),
        ("Hello", True),
        (alpaca_prompt("Bye"), False),
        ("Ciao", True),
    ]


def test_chat_template_marks_each_assistant_turn():
    tok = ce.tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    assert segments(record, tok, "chat") == [("<user>Hi</s><assistant>", False), ("Yo</s>", True)]
    # An instruction record is put in the chat template as one user turn.
    assert segments(RECORD, tok, "chat")[0] == ("<user>Add 2 and 3.</s><assistant>", False)


def test_packing_cuts_fixed_blocks_and_no_packing_truncates(tmp_path):
    rows = [{"instruction": f"Q{i}", "output": "A" * i} for i in range(30)]
    records = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    lengths = [len(tokenize(segments(r, TOK, "alpaca"), TOK, False, "alpaca")["input_ids"]) for r in rows]
    packed = build_dataset(records, TOK, seq_len=50)
    assert len(packed) == sum(lengths) // 50 and {len(x) for x in packed["input_ids"]} == {50}
    single = build_dataset(records, TOK, seq_len=100, packing=False)
    assert [len(x) for x in single["input_ids"]] == [min(n, 100) for n in lengths]


def test_parquet_and_limit(tmp_path):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([RECORD] * 5).to_parquet(str(path))
    assert len(load_records(str(path), limit=3)) == 3


def test_unreachable_hub_dataset_says_to_use_a_local_file(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The libraries read those variables when first imported, which in a full run was long before:
    # without these, the lookup tries the network and waits out its timeouts (about 20 s offline).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ce.CompressedExpertsError, match="Without network, give a local .json/.jsonl/.parquet file"):
        load_records("nobody-here/no-such-dataset")


def test_sequences_without_a_loss_token_are_left_out(tmp_path):
    # Long prompts, one-character responses: with response-only loss most 40-token blocks hold
    # prompt text only, and a batch of those would have a loss of 0/0.
    records = load_records(write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Q" * 30, "output": "A"}] * 20))
    kept = build_dataset(records, TOK, seq_len=40, response_only=True)
    every = build_dataset(records, TOK, seq_len=40)
    # Which blocks hold a loss token, worked out from one record's tokens: the 20 identical records
    # of L tokens each, one after another, cut into blocks of 40 (the partial last block dropped).
    one = build_dataset(records.select([0]), TOK, seq_len=10_000, packing=False, response_only=True)[0]["labels"]
    length, in_loss = len(one), [i for i, label in enumerate(one) if label != IGNORE]
    count = 20 * length // 40
    with_loss = sorted({(r * length + i) // 40 for r in range(20) for i in in_loss} & set(range(count)))
    assert len(every) == count and 0 < len(with_loss) < count
    assert kept["input_ids"] == [every["input_ids"][b] for b in with_loss]
    assert all(any(label != IGNORE for label in row) for row in kept["labels"])
    with pytest.raises(ce.CompressedExpertsError, match="no sequence has a token in the loss"):
        build_dataset(records, TOK, seq_len=40, response_only=True, packing=False)
