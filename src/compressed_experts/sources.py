"""Where a model comes from: the names a ``source`` may take, resolved in one place.

A source is one of

- ``"bundled"``: the small MoE shipped in the package (:data:`BUNDLED_DIR`, written by
  ``compressed-experts toy pretrain --ship``); a local folder named ``bundled`` still wins;
- ``"tiny:<family>"``: a tiny model of that family with random weights (offline try-outs, tests);
- a local directory written by ``save_pretrained``;
- a hub id, ``org/name``.

Loading (:mod:`.checkpoint`) and the output-directory checks (which must know what a source
reads, so as not to overwrite it) both resolve sources here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .errors import CheckpointError, CompressedExpertsError

#: Source name of the bundled model: ``ce.from_pretrained("bundled")``, ``--model bundled``.
BUNDLED = "bundled"
#: The directory shipped in the package (written by ``compressed-experts toy pretrain --ship``).
BUNDLED_DIR = Path(__file__).parent / "bundled_model"
#: Prefix of a tiny random model's source: ``tiny:olmoe``.
TINY_PREFIX = "tiny:"
#: Hub ids of models are "org/name": each part of word characters, "." and "-", neither starting nor
#: ending with "." or "-" and holding no ".." or "--" (the hub's rules), so that ``./model`` or
#: ``../runs/x`` (a path that is not there) is reported as a missing directory, not a bad repo id.
HUB_ID = re.compile(r"(?!.*(?:\.\.|--))\w(?:[\w.-]*\w)?/\w(?:[\w.-]*\w)?")


def resolve(source: Any) -> str:
    """The source as a string; ``"bundled"`` becomes the directory of the model shipped in the package.

    Raises a :class:`CompressedExpertsError` for a source that is not a string or path, and a
    :class:`CheckpointError` when the bundled model is asked for but missing from the installation.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise CompressedExpertsError(f"source must be a directory, a hub id or tiny:<family>, not {source!r}")
    source = os.fspath(source)
    if source == BUNDLED and not Path(source).exists():  # a local folder of that name still wins
        if not (BUNDLED_DIR / "config.json").is_file():
            raise CheckpointError(
                f"the bundled model is missing from this installation ({BUNDLED_DIR}); "
                f"rebuild it with: compressed-experts toy pretrain --ship"
            )
        return str(BUNDLED_DIR)
    return source


def tiny_family(source: str) -> str | None:
    """The family of a ``tiny:<family>`` source (as given, checked when the model is built), else None."""
    return source[len(TINY_PREFIX) :] if source.startswith(TINY_PREFIX) else None


def is_hub_id(source: str) -> bool:
    """Whether ``source`` has the form of a hub id, ``org/name`` (it may still name no model)."""
    return HUB_ID.fullmatch(source) is not None


def local_dir(source: str, subfolder: str | None = None) -> Path | None:
    """The local directory a resolved source reads (``subfolder`` included), or None (a hub id or tiny model)."""
    if tiny_family(source) is not None:
        return None
    path = Path(source, subfolder or "")
    return path if path.is_dir() else None


def local_path(source: Any) -> Path | None:
    """The file or directory on this machine that ``source`` reads, if any: the bundled model's
    directory for ``"bundled"``, the path itself for an existing file or folder; None for tiny
    models, hub ids and sources that are not there (or cannot be resolved)."""
    if source is None:
        return None
    try:
        source = resolve(source)
    except CompressedExpertsError:
        return None
    if tiny_family(source) is not None:
        return None
    path = Path(source)
    return path if path.exists() else None
