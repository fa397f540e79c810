"""Training-free fitting on calibration text: it gets closer to the full block, changes only the
compressed experts, is deterministic, saves and loads, and refuses bad input before any work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILY_NAMES, assert_same_logits, compressed_layers, distance_to_full, full_twin
from typer.testing import CliRunner

import compressed_experts as ce
from compressed_experts.cli import app
from compressed_experts.fit import calibration_blocks, fit

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 40


def blocks(seq_len=32, count=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 100, (count, seq_len), generator=g)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["ia3", "subset", "slim"])
def test_fitting_brings_every_form_closer_to_full_top_k(form):
    torch.manual_seed(0)
    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(3, form))
    held_out = blocks(seed=1)
    before = distance_to_full(model, held_out)
    report = fit(model, blocks(count=64), steps=40, batch_tokens=512, progress=False)
    after = distance_to_full(model, held_out)
    # On tokens the fit never saw. The ia3 vectors of a random tiny model only fit what they saw
    # (on the bundled model they generalise: RESULTS.md), so for them the check is in-sample.
    if form != "ia3":
        assert after < 0.95 * before, (before, after)
    assert len(report["blocks"]) == len(compressed_layers(model))
    for row in report["blocks"]:
        assert row["tokens"] == 64 * 32
        if form != "subset":  # subset has nothing to fit beyond its choice of neurons
            assert row["relative_error_after"] < 0.97 * row["relative_error_before"]


def test_fit_changes_only_the_compressed_experts_and_is_deterministic():
    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2, "ia3"))
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fit(model, blocks(), steps=10, progress=False, seed=3)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, original[n])}
    assert changed and all(ce.layer.is_compressed_expert(n) for n in changed)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    again = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2, "ia3"))
    fit(again, blocks(), steps=10, progress=False, seed=3)
    other = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2, "ia3"))
    fit(other, blocks(), steps=10, progress=False, seed=4)
    # Same seed: the same result up to the order of multi-threaded float sums; another seed: a different one.
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert max((p - s).abs().max().item() for p, s in zip(model.parameters(), other.parameters())) > 1e-3


@pytest.mark.parametrize("form", ["subset", "slim"])
def test_fitting_the_neuron_forms_reorders_neurons_but_keeps_the_full_model(form):
    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2, form, r=4))
    ids = blocks(seed=2)
    with torch.no_grad():
        full_before = full_twin(model)(ids).logits
    report = fit(model, blocks(count=32), steps=5, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(full_twin(model)(ids).logits, full_before, rtol=1e-5, atol=1e-5)
    for row in report["blocks"]:  # the measured choice of neurons beats the weight-based one, in-sample
        assert row["relative_error_before"] < row["relative_error_converted"]


def test_all_neurons_reproduce_the_full_block_exactly():
    """With r = I the subset form is the full block: the captured inputs and targets must agree."""
    model = ce.tiny_model("olmoe")
    model = ce.convert(model, ce.CEConfig(2, "subset", r=model.config.intermediate_size))
    report = fit(model, blocks(), progress=False)
    assert all(row["relative_error_before"] < 1e-10 for row in report["blocks"])


def test_calibration_text_sources(tmp_path):
    tokenizer = ce.tiny_tokenizer()
    (tmp_path / "c.txt").write_text(TEXT)
    from_txt = calibration_blocks(tokenizer, str(tmp_path / "c.txt"), seq_len=64, tokens=512)
    assert from_txt.shape == (8, 64)
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"text": TEXT[i : i + 300]}) + "\n" for i in range(0, 2000, 300))
    )
    shuffled = [
        calibration_blocks(tokenizer, str(tmp_path / "c.jsonl"), seq_len=64, tokens=256, seed=s) for s in (0, 0, 1)
    ]
    assert torch.equal(shuffled[0], shuffled[1]) and not torch.equal(shuffled[0], shuffled[2])


def test_bad_input_is_refused_before_any_work(tmp_path):
    tokenizer = ce.tiny_tokenizer()
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "short.txt").write_text("x = 1")
    with pytest.raises(ce.CompressedExpertsError, match="holds no text"):
        calibration_blocks(tokenizer, str(tmp_path / "empty.txt"))
    with pytest.raises(ce.CompressedExpertsError, match="fewer than one block of 64"):
        calibration_blocks(tokenizer, str(tmp_path / "short.txt"), seq_len=64, tokens=512)
    with pytest.raises(ce.CompressedExpertsError, match="no such calibration file"):
        calibration_blocks(tokenizer, str(tmp_path / "missing.txt"))
    with pytest.raises(ce.CompressedExpertsError, match="tokens must be at least one block"):
        calibration_blocks(tokenizer, str(tmp_path / "short.txt"), seq_len=64, tokens=10)
    with pytest.raises(ce.CompressedExpertsError, match="convert it first"):
        fit(ce.tiny_model("olmoe"), blocks(), progress=False)
    with pytest.raises(ce.CompressedExpertsError, match="nothing to fit"):
        fit(ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2, "none")), blocks(), progress=False)
    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2))
    for kwargs, message in (
        ({"steps": -1}, "steps must be"),
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"batch_tokens": 0}, "batch_tokens must be"),
    ):
        with pytest.raises(ce.CompressedExpertsError, match=message):
            fit(model, blocks(), progress=False, **kwargs)
    with pytest.raises(ce.CompressedExpertsError, match="non-empty"):
        fit(model, torch.empty(0, 8, dtype=torch.long), progress=False)


def test_fit_command_writes_a_model_that_loads_back(tmp_path):
    runner = CliRunner()
    (tmp_path / "calib.txt").write_text(TEXT)
    out = tmp_path / "fitted"
    args = [
        "fit",
        "tiny:olmoe",
        "--n-ce",
        "2",
        "--form",
        "slim",
        "--r",
        "4",
        "--calib",
        str(tmp_path / "calib.txt"),
        "--seq-len",
        "64",
        "--tokens",
        "1024",
        "--steps",
        "5",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "fit_report.json").read_text())
    assert report["form"] == "slim" and report["r"] == 4 and report["calibration_tokens"] == 1024
    loaded = ce.from_pretrained(out)
    assert ce.ce_config_of(loaded) == ce.CEConfig(2, "slim", r=4)
    # A plain model without --n-ce, a form that is not there, a bad form or r (before the missing
    # calibration file is even looked at) fail with one line and no output.
    missing = ["--calib", str(tmp_path / "missing.txt")]
    for bad, message in (
        (["fit", "tiny:olmoe", "--out", str(tmp_path / "x")], "give --n-ce"),
        (
            ["fit", "tiny:olmoe", "--n-ce", "2", "--form", "lora", *missing, "--out", str(tmp_path / "x")],
            "choose from ia3, none, subset, slim",
        ),
        (
            ["fit", "tiny:olmoe", "--n-ce", "2", "--form", "none", *missing, "--out", str(tmp_path / "x")],
            "nothing to fit",
        ),
        (
            [
                "fit",
                "tiny:olmoe",
                "--n-ce",
                "2",
                "--form",
                "slim",
                "--r",
                "999",
                *missing,
                "--out",
                str(tmp_path / "x"),
            ],
            "use --r between 1 and",
        ),
        (
            ["fit", "tiny:olmoe", "--n-ce", "2", "--steps", "-1", *missing, "--out", str(tmp_path / "x")],
            "steps must be a whole number",
        ),
        (["fit", str(out), "--form", "ia3", "--out", str(tmp_path / "y")], "already has compressed experts"),
        (args[:-1] + [str(tmp_path / "z"), "--r", "999"], "use --r between 1 and"),
    ):
        result = runner.invoke(app, bad)
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_fits_and_round_trips(family, tmp_path):
    """Capture works whatever the block around the experts (shared experts, sparsemixer, grouped routing)."""
    model = ce.tiny_model(family)
    top_k = model.config.num_experts_per_tok
    model = ce.convert(model, ce.CEConfig(top_k // 2, "slim", r=2))
    report = fit(model, blocks(count=8), steps=10, batch_tokens=128, progress=False)
    assert len(report["blocks"]) == len(compressed_layers(model))
    assert all(row["relative_error_after"] < row["relative_error_converted"] for row in report["blocks"])
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert_same_logits(ce.from_pretrained(tmp_path)(blocks(count=2)).logits, model(blocks(count=2)).logits)


def test_fit_settings_given_the_wrong_way_are_clear_errors():
    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2))
    with pytest.raises(ce.CompressedExpertsError, match="config must be a FitConfig"):
        fit(model, blocks(count=2), 100)  # steps given positionally
    with pytest.raises(ce.CompressedExpertsError, match="not both"):
        fit(model, blocks(count=2), ce.FitConfig(steps=1), steps=2)
    with pytest.raises(ce.CompressedExpertsError, match="unexpected keyword argument 'step'.*FitConfig"):
        fit(model, blocks(count=2), step=1)
