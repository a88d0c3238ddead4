"""User-facing errors and warnings: anything a user can fix (bad path, bad option, corrupt file) raises UserError;
what a user should know but that does not stop the run is a VQMobileWarning (Python's warnings machinery).

The CLI prints both as one line (errors exit non-zero); every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, stated as one line that says what is wrong and what to do."""


class FormatError(UserError):
    """A checkpoint, bundle or weight file that is corrupt, tampered with or inconsistent with its manifest."""


class VQMobileWarning(UserWarning):
    """Something the user should know that does not stop the run, stated as one line."""


class QualityWarning(VQMobileWarning):
    """A configuration that runs but is expected to give a poor model: the line says what to expect and instead."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (third-party errors can span many), never empty."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
