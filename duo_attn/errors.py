"""What can go wrong, by cause: each error type names where to look."""

from __future__ import annotations


class PatternError(ValueError):
    """A pattern file or argument is malformed or does not fit the model."""


class ModelError(ValueError):
    """The model (or how it is called) cannot run duo attention: an unsupported architecture or setting, a model
    that is not patched, or inputs the patched model refuses."""


class DuoCacheError(RuntimeError):
    """An operation the dual cache cannot perform, or a cache that does not belong to this model."""


class TransformersVersionError(RuntimeError):
    """The installed transformers does something this library does not know how to patch."""
