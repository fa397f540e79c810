"""Issue 19, sections 2 and 4: no command deletes or overwrites what it was not told to, and a
checkpoint that was damaged or edited after saving is refused with one clear line.

Each case the issue lists is one test (or one step of one) here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAST, randomise_compressed_experts, write_arithmetic
from typer.testing import CliRunner

import compressed_experts as ce
from compressed_experts import checkpoint
from compressed_experts.checkpoint import (
    MARKER,
    check_output_dir,
    lock_file,
    output_lock,
    read_manifest,
    save_model,
    verify_checkpoint,
)
from compressed_experts.cli import app
from compressed_experts.evaluation import compare
from compressed_experts.evaluation.report import check_results_file, save_results
from compressed_experts.toy.demo import QUICK, run_demo
from compressed_experts.training import TrainConfig, train

runner = CliRunner()


def _cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())


def _one_line(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message, message
    return message


@pytest.fixture
def model_dir(tmp_path):
    """A converted tiny model saved by the library (marker and checksum manifest), with a tokenizer."""
    model = ce.from_pretrained("tiny:olmoe", n_ce=2)
    randomise_compressed_experts(model)
    model.config.max_position_embeddings = 4096  # room for the character tokenizer's prompts (eval refuses longer)
    save_model(model, tmp_path / "model", tokenizer=ce.tiny_tokenizer())
    return tmp_path / "model"


def _refused(source, **kwargs) -> str:
    with pytest.raises(ce.CheckpointError) as caught:
        ce.from_pretrained(source, **kwargs)
    return _one_line(caught.value)


# Section 2: outputs.


def test_convert_and_fit_refuse_an_out_above_their_source(tmp_path):
    inner = tmp_path / "M" / "inner"
    save_model(ce.tiny_model("olmoe"), inner, tokenizer=ce.tiny_tokenizer())
    for command in (["convert", inner, "--n-ce", "1"], ["fit", inner, "--n-ce", "1", "--steps", "1"]):
        code, text = _cli(*command, "--out", tmp_path / "M", "--overwrite")
        assert code == 2 and "overlaps the source model" in text, text
    assert (inner / "model.safetensors").is_file()


def test_overwrite_refuses_a_project_folder_that_holds_a_config_json(tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "config.json").write_text("{}")
    (project / "code.py").write_text("print('mine')")
    code, text = _cli("convert", "tiny:olmoe", "--n-ce", "1", "--out", project, "--overwrite")
    assert code == 2 and "did not write" in text and "not deleting it" in text, text
    settings = {**FAST, "data": str(write_arithmetic(tmp_path / "d.jsonl", n=8)), "max_steps": 1}
    with pytest.raises(ce.CompressedExpertsError, match="did not write"):
        train(TrainConfig(**settings, out=str(project), overwrite=True))
    assert (project / "code.py").read_text() == "print('mine')"


def test_overwrite_refuses_a_model_saved_by_save_pretrained_and_replaces_the_librarys_own(tmp_path):
    mine = tmp_path / "mine"
    ce.tiny_model("olmoe").save_pretrained(mine)  # the user's own save: no marker
    code, text = _cli("convert", "tiny:olmoe", "--n-ce", "1", "--out", mine, "--overwrite")
    assert code == 2 and "saved by save_pretrained or another tool" in text and MARKER in text, text
    assert ce.ce_config_of(ce.from_pretrained(mine)) is None  # untouched
    ours = tmp_path / "ours"
    assert _cli("convert", "tiny:olmoe", "--n-ce", "1", "--out", ours)[0] == 0
    manifest = read_manifest(ours)
    assert manifest["written_by"] == "compressed-experts" and manifest["kind"] == "model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    code, text = _cli("convert", "tiny:olmoe", "--n-ce", "2", "--out", ours, "--overwrite")
    assert code == 0, text
    assert ce.ce_config_of(ce.from_pretrained(ours)) == ce.CEConfig(2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no lock or staging left


def test_eval_never_writes_over_its_inputs_or_an_existing_file(tmp_path, model_dir):
    data = tmp_path / "DATA.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    config_before = (model_dir / "config.json").read_bytes()
    base = ["eval", "--model", model_dir, "--task", "gsm8k", "--data", data, "--limit", "1"]
    for out, message in ((model_dir / "config.json", "lies inside the model"), (data, "is the data")):
        code, text = _cli(*base, "--out", out, "--overwrite")
        assert code == 2 and message in text and "--out" in text, text
    assert (model_dir / "config.json").read_bytes() == config_before
    assert data.read_text().startswith('{"question"')
    # A results file is never replaced silently, and --overwrite replaces only a results file.
    notes = tmp_path / "notes.json"
    notes.write_text("{}")
    with pytest.raises(ce.CompressedExpertsError, match="already exists.*overwrite"):
        check_results_file(notes)
    with pytest.raises(ce.CompressedExpertsError, match="only replaces a results file"):
        check_results_file(notes, overwrite=True)
    with pytest.raises(ce.CompressedExpertsError, match="is a folder"):
        check_results_file(tmp_path)
    results = tmp_path / "r.json"
    code, text = _cli(*base, "--out", results)
    assert code == 0 and results.is_file(), text
    code, text = _cli(*base, "--out", results)
    assert code == 2 and "already exists" in text and "--overwrite" in text, text
    assert _cli(*base, "--out", results, "--overwrite")[0] == 0


def test_compare_plot_is_a_new_png_file(tmp_path):
    result = {
        "task": "gsm8k",
        "metric": "exact_match",
        "score": 0.5,
        "n": 2,
        "settings": {},
        "model": {"source": "m", "method": "full", "n_ce": 0, "active_parameters": 10, "top_k": 8},
        "examples": [],
    }
    save_results(result, tmp_path / "r.json")
    files = [tmp_path / "r.json"]
    for plot, message in (
        ("/", "is a folder"),
        (tmp_path, "is a folder"),
        (tmp_path / "plot", "must be a .png file name"),
        (tmp_path / "r.json", "must be a .png"),
    ):
        with pytest.raises(ce.CompressedExpertsError, match=message):
            compare(files, plot=plot)
    code, text = _cli("compare", files[0], "--plot", "/")
    assert code == 2 and "is a folder" in text, text
    compare(files, plot=tmp_path / "p.png")
    with pytest.raises(ce.CompressedExpertsError, match="already exists"):
        compare(files, plot=tmp_path / "p.png")
    compare(files, plot=tmp_path / "p.png", overwrite=True)
    (tmp_path / "photo.png").write_bytes(b"not a png")
    with pytest.raises(ce.CompressedExpertsError, match="only replaces a PNG plot"):
        compare(files, plot=tmp_path / "photo.png", overwrite=True)


def test_demo_checks_its_out_before_writing(tmp_path, monkeypatch):
    user = tmp_path / "userdir"
    (user / "data").mkdir(parents=True)
    (user / "data" / "math_train.jsonl").write_text("my data")
    with pytest.raises(ce.CompressedExpertsError, match="is not empty"):
        run_demo(user, QUICK, say=lambda _: None)
    with pytest.raises(ce.CompressedExpertsError, match="only replaces a demo directory.*not deleting them"):
        run_demo(user, QUICK, say=lambda _: None, overwrite=True)
    assert (user / "data" / "math_train.jsonl").read_text() == "my data"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ce.CompressedExpertsError, match="working directory or above it"):
        run_demo("/", QUICK, say=lambda _: None)
    code, text = _cli("demo", "--out", "/", "--quick")
    assert code == 2 and "working directory or above it" in text, text
    assert not os.path.exists("/seed0")
    code, text = _cli("toy", "forms", "--out", user, "--quick", "--overwrite")
    assert code == 2 and "only replaces a forms study directory" in text, text
    code, text = _cli("toy", "methods", "--out", user, "--quick", "--overwrite")
    assert code == 2 and "only replaces a methods study directory" in text, text


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from compressed_experts.checkpoint import output_lock
    with output_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
    """
)


def test_a_second_writer_fails_at_once(tmp_path):
    out = tmp_path / "model"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ce.CompressedExpertsError, match=f"being written by another run \\(pid {holder.pid}\\)"):
            check_output_dir(out)
        code, text = _cli("convert", "tiny:olmoe", "--n-ce", "1", "--out", out)
        assert code == 2 and "being written by another run" in text and "--out" in text, text
        with pytest.raises(ce.CompressedExpertsError, match="being written by another run"):
            save_model(ce.tiny_model("olmoe"), out)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (killed, its lock released by the system): the next writer goes ahead.
    assert _cli("convert", "tiny:olmoe", "--n-ce", "1", "--out", out)[0] == 0
    assert not lock_file(out).exists()
    with output_lock(out), output_lock(out):  # re-entrant within one process
        assert lock_file(out).exists()
    assert not lock_file(out).exists()


# Section 4: checkpoints.


def test_random_byte_flips_in_the_weights_are_refused(model_dir):
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    generator = torch.Generator().manual_seed(0)
    for position in torch.randint(header, len(data), (20,), generator=generator).tolist():
        data[position] ^= 0x10
    weights.write_bytes(bytes(data))
    assert "model.safetensors has changed since it was saved" in _refused(model_dir)
    code, text = _cli("info", model_dir, "--verify")
    assert code == 2 and "has changed since it was saved" in text, text


def test_large_checkpoints_check_what_is_cheap_on_load_and_everything_on_verify(model_dir, monkeypatch):
    monkeypatch.setattr(checkpoint, "VERIFY_LIMIT", 0)  # as if the checkpoint were larger than the limit
    monkeypatch.setattr(checkpoint, "_SMALL_FILE", 1 << 10)  # and its weights larger than a small file
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    norm = "model.norm.weight"
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    start = 8 + int.from_bytes(data[:8], "little") + header[norm]["data_offsets"][0]
    data[start : start + 4] = torch.tensor([1.5]).numpy().tobytes()  # a finite value, in place: size and header kept
    weights.write_bytes(bytes(data))
    assert ce.from_pretrained(model_dir) is not None  # cheap checks only: not caught on load
    assert "has changed since it was saved" in _refused(model_dir, verify=True)
    assert _cli("info", model_dir, "--verify")[0] == 2
    assert verify_checkpoint(model_dir, full=False)["manifest"] is True


def test_non_finite_weights_are_refused_by_name(tmp_path):
    model = ce.from_pretrained("tiny:olmoe", n_ce=2)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    save_model(model, tmp_path / "saved")  # the manifest matches: the finite check catches it
    assert "holds NaN or inf in model.layers.1.self_attn.q_proj.weight" in _refused(tmp_path / "saved")
    model.save_pretrained(tmp_path / "plain-save")  # no manifest at all
    assert "model.layers.1.self_attn.q_proj.weight" in _refused(tmp_path / "plain-save")
    code, text = _cli("info", tmp_path / "saved", "--verify")
    assert code == 2 and "NaN or inf in model.layers.1.self_attn.q_proj.weight" in text, text
    assert ce.from_pretrained(tmp_path / "saved", verify=False) is not None  # the opt-out


def test_swapped_data_offsets_in_the_header_are_refused(model_dir):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    same = {}
    for key, entry in header.items():
        if key != "__metadata__":
            same.setdefault((entry["dtype"], tuple(entry["shape"])), []).append(key)
    a, b = next(keys for keys in same.values() if len(keys) > 1)[:2]
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    swapped = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(swapped) == length
    weights.write_bytes(data[:8] + swapped + data[8 + length :])
    assert "has changed since it was saved (another safetensors header" in _refused(model_dir)


@pytest.mark.parametrize("field", ["n_ce", "num_experts_per_tok"])
def test_an_edited_config_is_refused(model_dir, field):
    config = json.loads((model_dir / "config.json").read_text())
    if field == "n_ce":
        config["compressed_experts"]["n_ce"] = 3
    else:
        config[field] = 6
    (model_dir / "config.json").write_text(json.dumps(config))
    message = _refused(model_dir)
    assert "config.json has changed since it was saved" in message and "verify=False" in message
    if field == "n_ce":
        loaded = ce.from_pretrained(model_dir, verify=False)  # edited on purpose: the opt-out loads it
        assert ce.ce_config_of(loaded).n_ce == 3


@pytest.mark.parametrize("deleted", ["one weight", "a whole expert"])
def test_a_deleted_expert_tensor_is_one_clear_line(tmp_path, deleted):
    from safetensors.torch import load_file, save_file

    ce.from_pretrained("tiny:olmoe", n_ce=2).save_pretrained(tmp_path / "m")  # no manifest: structure checks only
    weights = load_file(tmp_path / "m" / "model.safetensors")
    prefix = "model.layers.0.mlp.experts.5."
    for key in [k for k in weights if k.startswith(prefix) and (deleted != "one weight" or "up_proj" in k)]:
        del weights[key]
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    message = _refused(tmp_path / "m")
    if deleted == "one weight":  # transformers cannot concatenate the experts: its RuntimeError, as one line
        assert "do not fit the model its config.json describes (a tensor is missing" in message, message
    else:  # the experts concatenate to 63: named, with both shapes
        assert "model.layers.0.mlp.experts" in message and "[63, " in message and "[64, " in message, message


def test_a_deleted_ce_gate_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    ce.from_pretrained("tiny:olmoe", n_ce=2).save_pretrained(tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    gate = next(k for k in weights if k.endswith("ce_gate") and ".layers.1." in k)
    del weights[gate]
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    assert f"lacks {gate}" in _refused(tmp_path / "m")


def test_info_verify(model_dir, tmp_path):
    code, text = _cli("info", model_dir, "--verify")
    assert code == 0 and "verified:" in text and "no NaN or inf" in text, text
    ce.tiny_model("olmoe").save_pretrained(tmp_path / "plain")
    code, text = _cli("info", tmp_path / "plain", "--verify")
    assert code == 2 and "no checksum manifest" in text, text
    (model_dir / "tokenizer.json").unlink()
    assert "lacks tokenizer.json" in _refused(model_dir)
