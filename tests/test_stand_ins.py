"""Pruning with stand-ins (issue 18): the removed experts leave compressed experts behind, under the
``kept_experts`` rule. Checked against models built independently: the unpruned model (slim stand-ins
as wide as the experts copy them whole), the unpruned model with the removed experts silenced (ia3
stand-ins at their start), and a hand-computed block."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import compressed_experts as ce
from compressed_experts.architectures import family_of, moe_blocks
from compressed_experts.checkpoint import apply_compressed_experts, save_compressed_experts, save_model
from compressed_experts.cli import app
from compressed_experts.config import CEConfig
from compressed_experts.errors import CompressedExpertsError
from compressed_experts.layer import CompressedExperts, set_compute_path
from compressed_experts.parameters import active_parameters
from compressed_experts.prune import PruneConfig, kept_first, prune
from compressed_experts.training import TrainConfig
from compressed_experts.training.run import _check_structure

runner = CliRunner()
IDS = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def _calibration(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 128, (8, 64), generator=torch.Generator().manual_seed(seed))


def _layers(model) -> list[CompressedExperts]:
    return [m for m in model.modules() if isinstance(m, CompressedExperts)]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen3_moe", "phimoe"])
def test_slim_stand_ins_as_wide_as_the_experts_give_back_the_unpruned_model(family):
    """A slim stand-in of r = I neurons starts as a copy of the whole removed expert: before any fitting
    the pruned model (kept experts renumbered first, removed weights dropped) is the unpruned one."""
    reference, model = ce.tiny_model(family), ce.tiny_model(family)
    want = _logits(reference)
    intermediate = next(moe_blocks(reference, family_of(reference)))[1].experts.down_proj.shape[-1]
    keep = {"olmoe": 16, "mixtral": 4, "qwen3_moe": 7, "phimoe": 2}[family]
    prune(model, _calibration(), keep=keep, stand_in="slim", r=intermediate, fit_steps=0)
    for layer in _layers(model):
        assert layer.removed and layer.gate_up_proj.shape[0] == keep
        assert layer.ce_down_proj.shape[0] == layer.num_experts - keep
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)


def test_ia3_stand_ins_at_their_start_add_nothing_for_the_removed_experts():
    """ia3 vectors start at 1: a token's kept experts run as they are and its removed ones add nothing,
    which is the unpruned model with the removed experts' outputs zeroed (their down projections)."""
    reference, model = ce.tiny_model("olmoe"), ce.tiny_model("olmoe")
    report = prune(model, _calibration(), keep=16, stand_in="ia3", fit_steps=0)
    with torch.no_grad():
        for row, (_, block) in zip(report["blocks"], moe_blocks(reference, family_of(reference))):
            block.experts.down_proj[row["stand_ins"]] = 0
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)
    layer = _layers(model)[0]
    assert layer.ce_gate.shape == (64 - 16, layer.hidden_dim)  # vectors for the removed experts only


def _hand_block(layer: CompressedExperts, full: tuple[torch.Tensor, torch.Tensor], x, index, weights) -> torch.Tensor:
    """The block by hand in float64 from its own definition: kept experts (ids below kept_experts) in full;
    each routed removed expert ``e`` replaced by its slim MLP ``e - kept`` (``full``: every expert's weights)."""
    gate_up, down = (w.double() for w in full)
    small_gate_up, small_down = layer.ce_gate_up_proj.double(), layer.ce_down_proj.double()
    kept, r, inter = layer.kept_experts, layer.r, layer.intermediate_dim
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double()
        for e, w in zip(index[t].tolist(), weights[t].double()):
            if e < kept:
                h = F.silu(gate_up[e, :inter] @ xt) * (gate_up[e, inter:] @ xt)
                out[t] += w * (down[e] @ h)
            else:
                g, u = small_gate_up[e - kept, :r], small_gate_up[e - kept, r:]
                out[t] += w * (small_down[e - kept] @ (F.silu(g @ xt) * (u @ xt)))
    return out


@pytest.mark.parametrize("path", ["eager", "grouped", "loop"])
def test_every_path_computes_the_rule_as_defined_before_and_after_removal(path):
    model = ce.tiny_model("olmoe")
    kept_first(model, {name: list(range(40, 56)) for name, _ in moe_blocks(model, family_of(model))})
    ce.convert(model, CEConfig(form="slim", r=4, kept_experts=16))
    layer = _layers(model)[0]
    with torch.no_grad():
        for p in layer.compressed.parameters():
            p.add_(0.1 * torch.randn_like(p))
    full = (layer.gate_up_proj.detach().clone(), layer.down_proj.detach().clone())
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(40, layer.hidden_dim, generator=generator)
    index = torch.stack([torch.randperm(64, generator=generator)[:8] for _ in range(40)])
    index[0] = torch.arange(16, 24)  # a token routed to removed experts only: no main expert at all
    index[1] = torch.arange(8)  # and one routed to kept experts only
    weights = torch.rand(40, 8, generator=generator)
    want = _hand_block(layer, full, x, index, weights)
    set_compute_path(model, path)
    for removed in (False, True):
        if removed:
            layer.remove_experts()
            assert layer.gate_up_proj.shape[0] == 16 and layer.num_experts == 64
        with torch.no_grad():
            got = layer(x, index, weights)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # gradients reach the stand-ins (fine-tuning a pruned model trains them)
    layer.zero_grad()
    layer(x, index, weights).square().sum().backward()
    assert layer.ce_gate_up_proj.grad.abs().sum() > 0 and layer.gate_up_proj.grad.abs().sum() > 0


def test_fitting_moves_the_stand_ins_towards_the_unpruned_model():
    reference = ce.tiny_model("olmoe")
    fitted, unfitted = ce.tiny_model("olmoe"), ce.tiny_model("olmoe")
    report = prune(fitted, _calibration(), keep=16, stand_in="slim", r=4, fit_steps=30)
    prune(unfitted, _calibration(), keep=16, stand_in="slim", r=4, fit_steps=0)
    assert report["stand_in"] == {"form": "slim", "r": 4}
    errors = [(b["relative_error_before"], b["relative_error_after"]) for b in report["fit"]["blocks"]]
    assert all(after < before for before, after in errors), errors
    want = _logits(reference)
    assert (_logits(fitted) - want).square().mean() < (_logits(unfitted) - want).square().mean()


def test_save_load_counts_and_what_needs_the_removed_weights(tmp_path):
    model = ce.tiny_model("olmoe")  # H=32, I=16, 64 experts, top-8, 2 MoE blocks
    before = active_parameters(model)["total"]
    calib = _calibration()
    prune(model, calib, keep=16, stand_in="slim", r=4, fit_steps=2)
    save_model(model, tmp_path / "pruned")
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert saved["model_type"] == "compressed_experts" and saved["num_experts"] == 64  # the router's
    assert saved["compressed_experts"]["kept_experts"] == 16 and saved["compressed_experts"]["format_version"] == 4
    loaded = ce.from_pretrained(tmp_path / "pruned")
    assert torch.equal(_logits(loaded), _logits(model))
    # counts: 48 removed experts of 3*32*16 weights per block, 48 slim MLPs of 3*32*4 added
    counts = active_parameters(loaded, calib)
    assert counts["total"] == before - 2 * 48 * 3 * 32 * 16 + 2 * 48 * 3 * 32 * 4
    assert counts["total"] == sum(p.numel() for p in loaded.parameters())
    # main experts per token, measured: the routed slots whose expert was kept, counted from the routing
    routed = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: routed.append((args[1] < 16).sum(-1).float()))
        for layer in _layers(loaded)
    ]
    with torch.no_grad():
        loaded(calib)
    for hook in hooks:
        hook.remove()
    assert counts["main_experts_per_token"] == pytest.approx(torch.cat(routed).mean().item(), rel=1e-6)
    assert ce.describe(loaded)["rule"] == "kept_experts=16"
    layer = _layers(loaded)[0]
    x = torch.randn(3, layer.hidden_dim)
    with pytest.raises(CompressedExpertsError, match="weights are gone"):
        layer.full(x, torch.zeros(3, 8, dtype=torch.long), torch.ones(3, 8))
    with pytest.raises(CompressedExpertsError, match="weights are gone"):
        ce.fit(loaded, calib, steps=1, progress=False)
    # ... refused before any text or weight is read: the fit command, and training with distillation
    fitting = runner.invoke(app, ["fit", str(tmp_path / "pruned"), "--out", str(tmp_path / "fitted")])
    assert fitting.exit_code == 2 and "pruned with stand-ins (kept_experts=16)" in fitting.output, fitting.output
    run = TrainConfig(
        model=str(tmp_path / "pruned"), data="unread.jsonl", out=str(tmp_path / "run"), distill_weight=1.0
    )
    with pytest.raises(CompressedExpertsError, match="pruned with stand-ins"):
        _check_structure(run)
    # Its stand-ins alone mean nothing on the unpruned model (experts not renumbered, not removed).
    save_compressed_experts(loaded, tmp_path / "stand_ins.safetensors")
    with pytest.raises(CompressedExpertsError, match="apply only to that pruned model"):
        apply_compressed_experts(ce.tiny_model("olmoe"), tmp_path / "stand_ins.safetensors")


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"stand_in": "subset"}, "stand_in must be one of ia3, slim"),
        ({"stand_in": "none"}, "stand_in must be one of ia3, slim"),
        ({"r": 4}, "give stand_in='slim' too"),
        ({"stand_in": "ia3", "r": 4}, "form ia3 has none"),
        ({"stand_in": "slim", "fit_steps": -1}, "fit_steps must be a whole number"),
    ],
)
def test_bad_stand_in_settings_refused_when_built(settings, words):
    with pytest.raises(CompressedExpertsError, match=words):
        PruneConfig(keep=16, **settings)


def test_bad_rule_refused():
    with pytest.raises(CompressedExpertsError, match="cannot stand in"):
        CEConfig(form="subset", r=4, kept_experts=4)
    with pytest.raises(CompressedExpertsError, match="kept_experts must be a whole number"):
        CEConfig(kept_experts=0)
    with pytest.raises(CompressedExpertsError, match="exactly one of"):
        CEConfig(n_ce=2, kept_experts=4)
    with pytest.raises(CompressedExpertsError, match="keeps every one of the block's 64 experts"):
        ce.convert(ce.tiny_model("olmoe"), CEConfig(kept_experts=64))
    with pytest.raises(CompressedExpertsError, match="only a block under kept_experts"):
        _layers(ce.from_pretrained("tiny:olmoe", n_ce=2))[0].remove_experts()
    assert "--kept-experts" not in runner.invoke(app, ["convert", "--help"]).output  # set by prune, not a flag


def test_cli_prunes_with_stand_ins(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}" for i in range(200)))
    out = tmp_path / "pruned"
    args = ["prune", "tiny:mixtral", "--keep", "5", "--out", str(out), "--calib", str(calib)]
    result = runner.invoke(
        app, [*args, "--tokens", "512", "--seq-len", "64", "--stand-in", "slim", "--r", "4", "--fit-steps", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "slim stand-ins for the rest" in " ".join(result.output.split())  # the table title, wrapped
    report = json.loads((out / "prune_report.json").read_text())
    assert report["stand_in"] == {"form": "slim", "r": 4} and len(report["blocks"][0]["stand_ins"]) == 3
    loaded = ce.from_pretrained(out)
    assert _layers(loaded)[0].gate_up_proj.shape[0] == 5 and _layers(loaded)[0].ce_down_proj.shape[0] == 3
    bad = runner.invoke(app, ["prune", "tiny:mixtral", "--keep", "5", "--out", str(tmp_path / "bad"), "--r", "4"])
    assert bad.exit_code == 2 and "give stand_in='slim' too" in bad.output, bad.output
    wide = [*args[:-4], "--out", str(tmp_path / "bad"), "--stand-in", "slim", "--r", "999"]
    bad = runner.invoke(app, wide)
    assert bad.exit_code == 2 and "r=999 is more neurons" in bad.output and "ranking" not in bad.output, bad.output
    assert not (tmp_path / "bad").exists()


def test_cli_fits_stand_ins_in_float32_and_saves_them_in_the_sources_dtype(tmp_path):
    """A bfloat16 model pruned with stand-ins is saved in bfloat16 (not the float32 they were fitted in:
    pruning must not make the checkpoint larger), also when its config names no dtype (the weights'
    then); --dtype float32 keeps float32."""
    named = tmp_path / "bf16"
    save_model(ce.tiny_model("olmoe").to(torch.bfloat16), named, tokenizer=ce.tiny_tokenizer())
    unnamed = tmp_path / "bf16-no-dtype"
    shutil.copytree(named, unnamed)
    config = json.loads((unnamed / "config.json").read_text())
    del config["dtype"]
    (unnamed / "config.json").write_text(json.dumps(config))
    (unnamed / "compressed_experts_manifest.json").unlink()  # as another tool would have saved it
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}" for i in range(200)))
    for source, dtype, want in (
        (named, "auto", torch.bfloat16),
        (unnamed, "auto", torch.bfloat16),
        (named, "float32", torch.float32),
    ):
        out = tmp_path / f"{source.name}-{dtype}"
        args = ["prune", str(source), "--keep", "16", "--out", str(out), "--calib", str(calib), "--tokens", "512"]
        result = runner.invoke(
            app, [*args, "--seq-len", "64", "--stand-in", "slim", "--fit-steps", "2", "--dtype", dtype]
        )
        assert result.exit_code == 0, result.output
        assert json.loads((out / "config.json").read_text())["dtype"] == str(want).removeprefix("torch.")
        layer = _layers(ce.from_pretrained(out, dtype="auto"))[0]
        assert layer.gate_up_proj.dtype == layer.ce_gate_up_proj.dtype == want
