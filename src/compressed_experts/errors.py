"""Exceptions raised for user mistakes, so that callers (and the CLI) can show a clear message."""


class CompressedExpertsError(ValueError):
    """Base class: every error this library raises on purpose for a user mistake."""


class UnsupportedModelError(CompressedExpertsError):
    """The model is not a Mixture-of-Experts model of a family this library knows."""


class CheckpointError(CompressedExpertsError):
    """A directory or hub id cannot be loaded as a (compressed-experts) checkpoint."""
