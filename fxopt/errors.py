"""Errors fxopt raises. Each one names what is at fault: the node, the pass, the input, the file.

Every error derives from :class:`FxoptError`, so ``except fxopt.FxoptError`` catches them all.
"""


class FxoptError(Exception):
    """Base class of every error fxopt raises on purpose."""


class CaptureError(FxoptError):
    """The model could not be captured into a graph (``fxopt.capture``)."""


class InputError(FxoptError, TypeError):
    """Inputs of the wrong type, structure, rank, dtype or size for a captured graph."""


class PassError(FxoptError):
    """A pass failed or left a broken graph; the message names the pass and the node."""


class VerificationError(FxoptError):
    """After a pass, the graph's outputs no longer match the eager model's."""


class GenerationError(FxoptError, ValueError):
    """A generation request that cannot be served (too long, too large a batch, empty prompt)."""
