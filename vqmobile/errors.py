"""User-facing errors: anything a user can fix (bad path, bad option, corrupt file) raises UserError.

The CLI prints such errors as one line and exits non-zero; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, stated as one line that says what is wrong and what to do."""


class FormatError(UserError):
    """A checkpoint, bundle or weight file that is corrupt, tampered with or inconsistent with its manifest."""
