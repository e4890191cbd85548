"""Errors users can act on. The CLI prints them as one line (no traceback) and exits with status 2."""


class MoecraftError(ValueError):
    """Bad input or state that the user can fix: the message names the problem and where it is."""


class UnsupportedModelError(MoecraftError):
    """The model is not of a family moecraft knows."""


class DataError(MoecraftError):
    """A data file or data set is missing, empty or malformed."""


class TrainingInterrupted(MoecraftError):
    """Training stopped on SIGINT/SIGTERM; the CLI exits with ``exit_status`` (128 + the signal number)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum
