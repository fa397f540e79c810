"""The bundled model's corpus: real text that every Python installation carries and no one here wrote.

Training part: the standard library's Python source (outside its test suites) and the
documentation topics of ``pydoc_data``. Held-out part: the standard library's own test suite
(``Lib/test``), a different register of the same language (test code), kept out of
pretraining and used for the domain-adaptation task. Files are read in sorted order, so the
corpus is the same on every run of the same Python version.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from ..errors import CompressedExpertsError

_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "idle_test", "tests", "test"}
_MAX_FILE_BYTES = 400_000  # a few generated tables (unicode data) would otherwise dominate


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _readable(path: Path) -> str | None:
    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def training_texts() -> list[tuple[str, str]]:
    """(name, text) of the pretraining corpus: stdlib source outside test suites, then pydoc topics."""
    root = stdlib_dir()
    texts = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIPPED_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        text = _readable(path)
        if text and text.strip():
            texts.append((str(rel), text))
    from pydoc_data.topics import topics

    texts += [(f"pydoc_data:{name}", topics[name]) for name in sorted(topics)]
    return texts


def held_out_texts() -> list[tuple[str, str]]:
    """(name, text) of the held-out part: the files of the standard library's test suite."""
    suite = stdlib_dir() / "test"
    if not suite.is_dir():
        raise CompressedExpertsError(
            f"this Python has no standard-library test suite ({suite} is missing), which the held-out task "
            f"reads; install it (Debian/Ubuntu: the libpython3.x-testsuite package) or use a python.org, "
            f"pyenv or conda build"
        )
    texts = []
    for path in sorted(suite.rglob("*.py")):
        text = _readable(path)
        if text and text.strip():
            texts.append((str(path.relative_to(stdlib_dir())), text))
    return texts


def write_jsonl(texts: list[tuple[str, str]], path: Path) -> Path:
    """One ``{"text": ...}`` record per file: the plain-text layout the training pipeline reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for _, text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    return path
