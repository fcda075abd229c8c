"""User errors: bad input reported as one line on stderr with a non-zero exit, never a traceback."""


class UserError(Exception):
    """Bad input. The message says what is wrong and what to do about it."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached a command: it stops at once, leaving finished runs saved and no partial file.

    A `BaseException` (like `KeyboardInterrupt`), so that the runner's `except Exception`, which records a
    crashing run as failed, lets it through: the run in flight is not recorded, and the next run of the same
    command runs it again.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
