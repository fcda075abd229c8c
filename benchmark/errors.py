"""User errors: bad input reported as one line on stderr with a non-zero exit, never a traceback."""


class UserError(Exception):
    """Bad input. The message says what is wrong and what to do about it."""
