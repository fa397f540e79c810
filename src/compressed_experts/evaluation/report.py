"""Results files, and the paper-style comparison of several of them: one table and one plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from ..checkpoint import check_output_file, write_atomic
from ..errors import CompressedExpertsError

_REQUIRED = ("task", "metric", "score", "n", "settings", "model", "examples")
_MODEL_REQUIRED = ("source", "method", "n_ce", "active_parameters")
#: Settings under which scores of one task compare: any difference makes them different measurements.
_COMPARED_SETTINGS = ("data", "limit", "prompt", "max_new_tokens", "temperature", "num_fewshot")


def save_results(result: dict[str, Any], path: Path) -> None:
    """Write one evaluation's results as JSON (folders created as needed), in one step: readers see
    the whole file or none. Check ``path`` first (:func:`check_results_file`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")


def is_results_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a results file of compressed-experts eval (what ``overwrite`` may replace)."""
    try:
        load_results(path)
    except (CompressedExpertsError, OSError):
        return False
    return True


def check_results_file(
    path: str | os.PathLike, *, overwrite: bool = False, sources: dict[str, Any] | None = None
) -> None:
    """The output policy for a results file: not a folder, not an input (the model, its
    tokenizer, the data) nor inside one, not an existing file unless ``overwrite``, and then only
    a results file of compressed-experts eval."""
    check_output_file(path, overwrite=overwrite, sources=sources, what="results file", ours=is_results_file)


def _is_png(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n"


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results file written by :func:`compressed_experts.evaluation.evaluate`, checking its shape."""
    path = Path(path)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CompressedExpertsError(f"no such results file: {path}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CompressedExpertsError(f"{path} is not JSON: {err}") from err
    missing = [k for k in _REQUIRED if not isinstance(result, dict) or k not in result]
    if not missing and not isinstance(result["model"], dict):
        raise CompressedExpertsError(f"{path}: model is {_kind(result['model'])}, not an object; {_NOT_OURS}")
    missing += [f"model.{k}" for k in _MODEL_REQUIRED if not missing and k not in result["model"]]
    if missing:
        raise CompressedExpertsError(
            f"{path} is not a results file of compressed-experts eval: it lacks {', '.join(missing)}"
        )
    _check_types(result, path)
    return result


_NOT_OURS = "is it a results file of compressed-experts eval, edited or from another version?"
_METHODS = ("full", "top-m", "ce")


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"


def _check_types(result: dict[str, Any], path: Path) -> None:
    """Each field a comparison reads is of its type (they failed with a TypeError, or printed a
    score of 5.0 as 500% and NaN as nan%): named by file and field."""
    whole = lambda v, least: isinstance(v, int) and not isinstance(v, bool) and v >= least  # noqa: E731
    model = result["model"]
    checks = (
        ("task", result["task"], isinstance(result["task"], str) and result["task"], "a task name"),
        ("metric", result["metric"], isinstance(result["metric"], str), "a text"),
        ("n", result["n"], whole(result["n"], 1), "a whole number of examples, at least 1"),
        ("settings", result["settings"], isinstance(result["settings"], dict), "an object"),
        ("examples", result["examples"], isinstance(result["examples"], list), "a list"),
        ("model.source", model["source"], isinstance(model["source"], str) and model["source"], "a text"),
        ("model.method", model["method"], model["method"] in _METHODS, f"one of {', '.join(_METHODS)}"),
        (
            "model.n_ce",
            model["n_ce"],
            whole(model["n_ce"], 0) or (model["n_ce"] is None and isinstance(model.get("rule"), str)),
            "a whole number, 0 or more (or null, with the per-token rule in model.rule)",
        ),
        ("model.top_k", model.get("top_k"), model.get("top_k") is None or whole(model["top_k"], 1), "a whole number"),
        ("model.active_parameters", model["active_parameters"], whole(model["active_parameters"], 1), "a count"),
    )
    for name, value, ok, wanted in checks:
        if not ok:
            raise CompressedExpertsError(f"{path}: {name} is {_kind(value)}, not {wanted}; {_NOT_OURS}")
    score = result["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise CompressedExpertsError(f"{path}: score is {_kind(score)}, not a finite number; {_NOT_OURS}")


def check_fraction_score(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse a score outside [0, 1]: comparisons show scores as percentages and recovery as their
    ratios, which only means something for fractions (accuracy, exact match, pass@1)."""
    if not 0 <= result["score"] <= 1:
        raise CompressedExpertsError(
            f"{path}: score is {result['score']!r}, not a fraction in [0, 1] ({result['metric']}); compare "
            f"shows scores as percentages, so it takes fractions only (accuracy, exact match, pass@1)"
        )


def method_label(model: dict[str, Any]) -> str:
    """ "full top-8", "top-4" or "top-4 + 4 CE" (falls back to n_ce where top-k is unknown); with a
    per-token rule "top_p=0.6" or "top_p=0.6 + CE"."""
    k, n_ce, method = model.get("top_k"), model["n_ce"], model["method"]
    if method == "full":
        return f"full top-{k}" if k else "full"
    if n_ce is None:
        return model["rule"] if method == "top-m" else f"{model['rule']} + CE"
    main = f"top-{k - n_ce}" if k else f"top-(k-{n_ce})"
    return main if method == "top-m" else f"{main} + {n_ce} CE"


def gap_closed(score: float, baseline: float, reference: float, *, lower_is_better: bool = False) -> float | None:
    """The share of the gap from ``baseline`` to ``reference`` that ``score`` closes (e.g. of top-m's
    shortfall against full top-k, won back by compressed experts): 0 at the baseline, 1 at the
    reference. None when the baseline does not trail the reference: there is no gap to close."""
    gap = reference - baseline
    if (gap >= 0) if lower_is_better else (gap <= 0):
        return None
    return (score - baseline) / gap


def _model_key(model: dict[str, Any]) -> tuple[str, str, int | str]:
    """What tells models apart: the source alone does not, since the full, top-m and compressed-experts
    versions of one checkpoint share it (a model evaluated from code is named after its base model)."""
    return model["source"], model["method"], model["n_ce"] if model["n_ce"] is not None else model["rule"]


def _check_comparable(result: dict[str, Any], path: Path, first: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    """Refuse a result of a task that ran under other settings than the first result of that task."""
    mine = {"n": result["n"], **{name: result["settings"].get(name) for name in _COMPARED_SETTINGS}}
    earlier, theirs = first.setdefault(result["task"], (path, mine))
    differences = [f"{name} {theirs[name]!r} and {mine[name]!r}" for name in mine if mine[name] != theirs[name]]
    if differences:
        raise CompressedExpertsError(
            f"{earlier} and {path} ran {result['task']} under different settings ({'; '.join(differences)}), so "
            f"their scores do not compare: evaluate both the same way"
        )


def _reference(rows: list[dict[str, Any]], reference: str | None) -> dict[str, Any] | None:
    """The full top-k row that recovery is measured against: the one from ``reference``, else the only one."""
    full = [row for row in rows if row["method"] == "full"]
    if reference is None:
        return full[0] if len(full) == 1 else None
    chosen = [row for row in full if row["source"] == reference]
    if not chosen:
        candidates = ", ".join(row["source"] for row in full) or "none; evaluate the unmodified model too"
        raise CompressedExpertsError(
            f"no full top-k model from {reference} among the results; the candidates: {candidates}"
        )
    return chosen[0]


def compare(
    paths: list[str | os.PathLike],
    plot: str | os.PathLike | None = None,
    reference: str | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Gather results files into rows (one per model: source, method and n_ce) of scores per task, with recovery ratios.

    Results of one task must come from the same settings (data, limit, n, prompt, max_new_tokens,
    temperature, num_fewshot). A row's recovery is its score divided by the reference's, averaged
    over the tasks both have (None without a reference or a common task). The reference is the full
    top-k model whose source is ``reference``, or without it the only full model (None where there
    are several: choose one). Rows come in order of active parameters, largest first. With ``plot``,
    also writes a PNG of score against active parameters per token, one series per task: a new
    file, or with ``overwrite`` a PNG that is there (never one of the results files).
    """
    if not paths:
        raise CompressedExpertsError("give at least one results file")
    if plot is not None:
        check_output_file(
            plot,
            overwrite=overwrite,
            sources={f"results file {p}": p for p in paths},
            what="PNG plot",
            setting="plot",
            suffix=".png",
            ours=_is_png,
        )
    rows: dict[tuple[str, str, int | str], dict[str, Any]] = {}
    seen: dict[tuple[str, str, int | str, str], Path] = {}
    first: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in map(Path, paths):
        result = load_results(path)
        check_fraction_score(result, path)
        model = result["model"]
        key = (*_model_key(model), result["task"])
        if key in seen:
            raise CompressedExpertsError(
                f"{seen[key]} and {path} both hold {result['task']} of {model['source']} ({method_label(model)}): keep one"
            )
        seen[key] = path
        _check_comparable(result, path, first)
        row = rows.setdefault(_model_key(model), {**model, "label": method_label(model), "scores": {}})
        row["scores"][result["task"]] = result["score"]
    tasks = sorted(first)
    chosen = _reference(list(rows.values()), reference)
    for row in rows.values():
        common = [t for t in row["scores"] if chosen is not None and chosen["scores"].get(t)]
        ratios = [row["scores"][t] / chosen["scores"][t] for t in common]
        row["recovery"] = sum(ratios) / len(ratios) if ratios else None
    ordered = sorted(rows.values(), key=lambda r: (-r["active_parameters"], r["label"]))
    comparison = {"tasks": tasks, "rows": ordered, "reference": chosen["source"] if chosen is not None else None}
    if plot is not None:
        write_plot(comparison, Path(plot))
    return comparison


def comparison_table(comparison: dict[str, Any]) -> Table:
    """The comparison as the paper lays it out: method, active parameters, each task, recovery."""
    table = Table(title="quality against active parameters per token")
    for name, justify in (
        ("method", "left"),
        ("model", "left"),
        ("active params", "right"),
        *((task, "right") for task in comparison["tasks"]),
        ("recovery", "right"),
    ):
        table.add_column(name, justify=justify)
    for row in comparison["rows"]:
        scores = [f"{row['scores'][t]:.1%}" if t in row["scores"] else "-" for t in comparison["tasks"]]
        recovery = f"{row['recovery']:.1%}" if row["recovery"] is not None else "-"
        table.add_row(row["label"], row["source"], f"{row['active_parameters']:,}", *scores, recovery)
    return table


def write_plot(comparison: dict[str, Any], path: Path) -> None:
    """Score against active parameters, one series per task, each point labelled with its method (PNG)."""
    try:
        from matplotlib.figure import Figure  # the object API draws with Agg and leaves pyplot's backend alone
    except ImportError as err:
        raise CompressedExpertsError(
            "the plot needs matplotlib: pip install matplotlib, or leave the plot out"
        ) from err

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.add_subplot()
    for task in comparison["tasks"]:
        rows = [r for r in comparison["rows"] if task in r["scores"]]
        points = sorted((r["active_parameters"], r["scores"][task], r["label"]) for r in rows)
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=task)
        for x, y, label in points:
            axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("active parameters per token")
    axes.set_ylabel("score")
    axes.legend()
    axes.grid(alpha=0.3)
    axes.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
