"""Exception types.  Every error raised on bad user input is a ``KnapSpecError``.

``KnapSpecError`` subclasses ``ValueError`` so callers that already catch ``ValueError``
(the solver contract promises it for bad input) keep working.
"""


class KnapSpecError(ValueError):
    """Bad input or configuration, with a message that names the problem."""


class MissingDependencyError(KnapSpecError):
    """An optional dependency is not installed; the message says how to install it."""
