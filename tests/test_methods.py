"""The methods study (issue 18): every method at matched budgets on the bundled model, at the smallest settings."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from typer.testing import CliRunner

from compressed_experts.cli import app
from compressed_experts.errors import CompressedExpertsError
from compressed_experts.sources import BUNDLED
from compressed_experts.toy.demo import write_section
from compressed_experts.toy.methods import (
    BEGIN,
    END,
    METHODS,
    PRUNED,
    PRUNED_STAND_INS,
    QUICK_METHODS,
    STAGES,
    TOLERANCE,
    MethodsPlan,
    _resumable,
    check_study,
    run_methods,
    split_r,
    summarise_math,
    table_markdown,
)

#: The quick study made smaller still: budget 2 (one split to choose), short sequences, one fine-tuning step.
TINY = dataclasses.replace(
    QUICK_METHODS,
    budgets=(2, 8),
    seq_len=64,
    calib_tokens=1024,
    plan_tokens=1024,
    fit_steps=2,
    search_steps=10,
    finetune_budgets=(2,),
    finetune_methods=("slim", "top_p"),
    finetune_steps=1,
    batch_size=2,
    math_steps=1,
    math_train=16,
    math_test=2,
    math_methods=("slim", "top_p"),
)


@pytest.mark.slow
def test_every_method_at_its_budget_table_and_plots(tmp_path):
    results = run_methods(tmp_path, TINY, seeds=1, say=lambda _: None)
    for name in ("methods_results.json", "methods_rows.json", "methods_table.md"):
        assert (tmp_path / name).is_file()
    for name in ("methods_pareto_active.png", "methods_pareto_memory.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    rows = results["rows"]
    assert json.loads((tmp_path / "methods_rows.json").read_text())["rows"] == rows  # saved as it went
    free = {r["method"] for r in rows if r["stage"] == "training-free"}
    assert free == {"full top-k", *METHODS}
    by = {(r["stage"], r["method"], r["budget"]): r for r in rows}
    # Every method's measured expert-equivalents (calibration text) match its budget within the tolerance.
    for row in (r for r in rows if r["stage"] != "math"):  # math rows are scored by exact match only
        if row["method"] in ("full top-k", "pruned"):
            assert row["expert_equivalents"] == 8  # pruning saves memory, not compute
        elif row["method"] == "pruned, slim stand-ins":  # tokens routed to a removed expert run its stand-in
            assert 1 <= row["expert_equivalents"] < 8
        elif row["method"].startswith("planned"):  # never above its budget; below it when no mix fills it
            assert row["expert_equivalents"] <= row["budget"] + 1e-9
        else:
            assert abs(row["expert_equivalents"] - row["budget"]) <= TOLERANCE, row
    # Top-m at budget 8 is full top-k; pruning cuts memory; slim adds some.
    full = by[("training-free", "full top-k", 8)]
    assert by[("training-free", "top-m", 8)]["loss"] == pytest.approx(full["loss"], abs=1e-6)
    pruned = next(r for r in rows if r["method"] == "pruned")
    assert pruned["total"] < full["total"] < by[("training-free", "slim", 2)]["total"]
    # Stand-ins add their small MLPs to the pruned model's memory.
    standing = next(r for r in rows if r["method"] == "pruned, slim stand-ins")
    assert pruned["total"] < standing["total"] < full["total"] and standing["keep"] == pruned["keep"]
    # The split: one main expert and 7 auxiliary of r neurons, r as close to the budget as whole neurons go.
    assert results["splits"] == {"2": {"n_ce": 7, "r": split_r(2, 1, 8, 96)}} and split_r(2, 1, 8, 96) == 14
    # Gap closed, by hand: against top-m at the budget and full top-k, same stage (fine-tuned: same seed).
    for stage in ("training-free", "fine-tuned"):
        top_m, full_loss = by[(stage, "top-m", 2)]["loss"], by[(stage, "full top-k", 8)]["loss"]
        summary = next(s for s in results["summary"] if (s["stage"], s["method"], s["budget"]) == (stage, "slim", 2))
        expected = (top_m - by[(stage, "slim", 2)]["loss"]) / (top_m - full_loss)
        assert summary["gap_closed"][0] == pytest.approx(expected)
    tuned = {r["method"] for r in rows if r["stage"] == "fine-tuned"}
    assert tuned == {"full top-k", "top-m", "slim", "top_p", *PRUNED}
    # The pruned models are fine-tuned as saved: the same experts, the stand-ins kept (not converted back).
    for method in PRUNED:
        free, ft = (next(r for r in rows if (r["stage"], r["method"]) == (stage, method)) for stage in STAGES[:2])
        assert ft["keep"] == free["keep"] == 32 and ft["total"] == free["total"] and ft["budget"] is None
        assert (tmp_path / "seed0" / f"ft-{method.replace(', ', '-').replace(' ', '-')}-keep32").is_dir()
    # The math stage: the same runs fine-tuned on the math task, each scored by exact match on the test problems.
    math = [r for r in rows if r["stage"] == "math"]
    assert {r["method"] for r in math} == {"full top-k", "top-m", "slim", "top_p"}
    assert all(0 <= r["exact_match"] <= 1 for r in math) and "loss" not in math[0]
    for run in ("math-slim-2", "math-top_p-2"):  # each run's model, and its evaluation beside it
        assert (tmp_path / "seed0" / run).is_dir() and (tmp_path / "seed0" / f"{run}-eval.json").is_file()
    assert {(r["method"], r["budget"]) for r in results["math_summary"]} == {(r["method"], r["budget"]) for r in math}
    assert "| budget | method | setting | seeds | math exact match |" in table_markdown(results)
    report = tmp_path / "RESULTS.md"
    report.write_text(f"# Results\n\nabove\n\n{BEGIN}\nold\n{END}\n\nbelow\n")
    write_section(report, BEGIN, END, "compressed-experts toy methods", results["seconds"], table_markdown(results))
    text = report.read_text()
    assert (
        "above" in text
        and "below" in text
        and "old" not in text
        and "| training-free | 2 | slim | n_ce 7, r 14 |" in text
    )
    # An interrupted run: the rows saved so far render into the same table, and --report takes it.
    table = (tmp_path / "methods_table.md").read_text()
    (tmp_path / "methods_table.md").unlink()
    args = ["toy", "methods", "--report-only", "--out", str(tmp_path), "--report", str(report)]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert (tmp_path / "methods_table.md").read_text() == table and table.rstrip() in report.read_text()
    # Interrupted with slim's rows of every stage lost (and its saved model): --resume keeps the other
    # rows, measures the rest the way the first run did, and refuses other settings.
    saved = json.loads((tmp_path / "methods_rows.json").read_text())
    # Likewise the stand-ins model's rows, both stages, and its saved model: pruned and fitted again.
    lost = lambda r: (r["method"], r["budget"]) == ("slim", 2) or r["method"] == PRUNED_STAND_INS  # noqa: E731
    (tmp_path / "methods_rows.json").write_text(json.dumps({**saved, "rows": [r for r in rows if not lost(r)]}))
    shutil.rmtree(tmp_path / "seed0" / "slim-2")
    shutil.rmtree(tmp_path / "seed0" / "pruned-slim-stand-ins-keep32")
    with pytest.raises(CompressedExpertsError, match=r"other settings \(fit_steps\)"):
        run_methods(tmp_path, dataclasses.replace(TINY, fit_steps=3), seeds=1, resume=True, say=lambda _: None)
    resumed = run_methods(tmp_path, TINY, seeds=1, resume=True, say=lambda _: None)["rows"]
    key = lambda r: (r["stage"], r["method"], r["budget"], r.get("keep"))  # noqa: E731
    assert sorted(map(key, resumed)) == sorted(map(key, rows)) and (tmp_path / "seed0" / "slim-2").is_dir()
    assert (tmp_path / "seed0" / "pruned-slim-stand-ins-keep32").is_dir()
    again = {key(r): r for r in resumed}
    for row in rows:
        if lost(row) and row["stage"] == "math":  # fine-tuned again over its interrupted run's files
            assert again[key(row)]["exact_match"] == row["exact_match"], key(row)
        elif lost(row):  # measured again, from the same seeds: the same model
            assert again[key(row)]["loss"] == pytest.approx(row["loss"], abs=1e-4), key(row)
        else:
            assert again[key(row)] == row  # kept as it was


@pytest.mark.parametrize(
    ("change", "seeds", "expect"),
    [
        (dict(budgets=(0, 4)), 1, "whole numbers of expert-equivalents, 1 or more"),
        (dict(budgets=(2.5,)), 1, "whole numbers"),
        (dict(budgets=(9,), finetune_budgets=()), 1, "above full top-k"),
        (dict(budgets=(2,), finetune_budgets=(4,)), 1, "not among the budgets"),
        (dict(finetune_methods=("top-m",)), 1, "cannot fine-tune"),
        (dict(finetune_methods=("slim", "ia3")), 1, r"math_methods \['top_p', 'planned, slim fitted'\] are not among"),
        (dict(math_steps=0), 1, "math_steps must be a whole number, 1 or more"),
        (dict(keeps=(4,), finetune_keeps=()), 1, "fewer than the 8 experts"),
        (dict(finetune_keeps=(20,)), 1, r"finetune_keeps \[20\] are not among the keeps"),
        (dict(), 0, "seeds must be a whole number, at least 1"),
    ],
)
def test_bad_input_is_refused_before_any_work(change, seeds, expect):
    with pytest.raises(CompressedExpertsError, match=expect):
        check_study(MethodsPlan(**change), seeds, BUNDLED)


def test_the_command_refuses_bad_budgets_before_writing(tmp_path):
    for args, expect in (
        (["--budgets", "9"], "budget 9 is above full top-k"),
        (["--budgets", "0"], "1 or more"),
        (["--finetune-keeps", "20"], "--finetune-keeps [20] are not among the keeps [48, 32, 24, 16]"),
        (["--finetune-keeps", "32.5"], "--finetune-keeps [32.5] are not among"),
        (["--seeds", "0"], "--seeds must be"),
        (["--resume", "--overwrite"], "not both"),
        (["--resume", "--report-only"], "not both"),
    ):
        result = CliRunner().invoke(app, ["toy", "methods", "--out", str(tmp_path / "out"), *args])
        assert result.exit_code == 2 and expect in result.output
        assert not (tmp_path / "out").exists()


def test_math_summary_gap_closed_by_hand():
    """Exact match per seed against the same seed's full top-k and top-m; higher is better."""
    rows = [
        {"stage": "math", "method": m, "budget": b, "seed": seed, "setting": "x", "exact_match": v}
        for m, b, values in (
            ("full top-k", 8, (0.80, 0.90)),
            ("top-m", 4, (0.60, 0.80)),
            ("slim", 4, (0.75, 0.80)),
        )
        for seed, v in enumerate(values)
    ]
    rows.append({"stage": "training-free", "method": "slim", "budget": 4, "seed": 0, "setting": "x", "loss": 3.0})
    summary = {r["method"]: r for r in summarise_math(rows, top_k=8)}
    assert set(summary) == {"full top-k", "top-m", "slim"}  # the training-free row is not a math row
    closed = summary["slim"]["gap_closed"]
    # seed 0: (0.75 - 0.60) / (0.80 - 0.60) = 0.75; seed 1: (0.80 - 0.80) / (0.90 - 0.80) = 0
    assert closed[0] == pytest.approx(0.375) and closed[1] == pytest.approx(0.5303, abs=1e-4)
    assert summary["slim"]["exact_match"][0] == pytest.approx(0.775) and summary["full top-k"]["gap_closed"] is None
    # A seed where top-m is level with full top-k has no gap: left out of the mean and said in the table,
    # and with no gap on any seed there is none to report (not a NaN, not a crash).
    tied = [dict(r, exact_match=0.9) if (r["method"], r["seed"]) == ("top-m", 1) else r for r in rows]
    (slim,) = [r for r in summarise_math(tied, top_k=8) if r["method"] == "slim"]
    assert slim["gap_closed"] == (pytest.approx(0.75), 0.0) and slim["gap_seeds"] == 1
    table = table_markdown(
        {"seeds": 2, "summary": [], "settings": dataclasses.asdict(MethodsPlan()), "math_summary": [slim]}
    )
    assert "| 4 | slim | x | 2 | 77.5% ± 3.5% | 75% ± 0% (1 of 2 seeds had a gap) |" in table
    zeros = [dict(r, exact_match=0.0) for r in rows]
    assert all(r["gap_closed"] is None for r in summarise_math(zeros, top_k=8))


def test_a_study_saved_before_a_setting_existed_resumes(tmp_path):
    """Rows saved before the math stage's settings existed resume with those settings as now asked
    (they measured nothing then); a setting the run did save must still match."""
    settings = dataclasses.asdict(MethodsPlan())
    older = {k: v for k, v in settings.items() if not k.startswith("math_")}
    (tmp_path / "methods_rows.json").write_text(
        json.dumps({"settings": older, "model": BUNDLED, "seeds": 1, "rows": [], "seconds": 1.0})
    )
    assert _resumable(tmp_path, MethodsPlan(), BUNDLED)["rows"] == []
    assert _resumable(tmp_path, dataclasses.replace(MethodsPlan(), math_steps=300), BUNDLED)["rows"] == []
    with pytest.raises(CompressedExpertsError, match=r"other settings \(fit_steps\)"):
        _resumable(tmp_path, dataclasses.replace(MethodsPlan(), fit_steps=300), BUNDLED)


def test_a_resumed_study_may_add_methods_to_its_tuned_stages(tmp_path):
    """A study that fine-tuned three methods resumes with every method asked for (more rows, none
    changed); asking for fewer than it measured is refused, as another setting is."""
    three = ("slim", "top_p", "planned, slim fitted")
    settings = {**dataclasses.asdict(MethodsPlan()), "finetune_methods": list(three)}
    del settings["math_methods"]  # saved before the setting existed
    (tmp_path / "methods_rows.json").write_text(
        json.dumps({"settings": settings, "model": BUNDLED, "seeds": 1, "rows": [], "seconds": 1.0})
    )
    assert set(MethodsPlan().finetune_methods) > set(three)
    assert _resumable(tmp_path, MethodsPlan(), BUNDLED)["rows"] == []
    fewer = dataclasses.replace(MethodsPlan(), finetune_methods=("slim", "top_p"), math_methods=("slim",))
    with pytest.raises(CompressedExpertsError, match=r"other settings \(finetune_methods\)"):
        _resumable(tmp_path, fewer, BUNDLED)


@pytest.mark.slow
def test_pruned_models_are_fine_tuned_without_a_fine_tuned_budget(tmp_path):
    """With no budget to fine-tune at, the fine-tuned stage still runs for the pruned models (and full top-k,
    their reference): the models saved for it are fine-tuned, not left behind."""
    settings = dataclasses.replace(TINY, budgets=(8,), finetune_budgets=(), finetune_methods=(), math_methods=())
    rows = run_methods(tmp_path, settings, seeds=1, math=False, say=lambda _: None)["rows"]
    tuned = {(r["method"], r.get("keep")) for r in rows if r["stage"] == "fine-tuned"}
    assert tuned == {("full top-k", None), ("pruned", 32), (PRUNED_STAND_INS, 32)}
