"""Exceptions raised for user mistakes, so that callers (and the CLI) can show a clear message."""


class CompressedExpertsError(ValueError):
    """Base class: every error this library raises on purpose for a user mistake.

    ``settings`` lists the settings the message names, by their Python names (``n_ce``,
    ``out``): a front end shows them as its own spellings (the CLI as ``--n-ce``, ``--out``).
    """

    def __init__(self, message: str, *, settings: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.settings = tuple(settings)


class UnsupportedModelError(CompressedExpertsError):
    """The model is not a Mixture-of-Experts model of a family this library knows."""


class CheckpointError(CompressedExpertsError):
    """A directory or hub id cannot be loaded as a (compressed-experts) checkpoint."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, cut at ``limit`` characters (or its type's name
    when it has no message): what a one-line error shows of a library's failure, whose messages
    can run to many lines (transformers lists hundreds of model types)."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= limit else line[:limit] + "..."
