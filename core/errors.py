"""Errors a user can meet, each with the exit code the CLI returns for it."""


class TranslateError(Exception):
    """A problem the user can fix; the CLI prints it as one line."""

    exit_code = 1


class UsageError(TranslateError):
    """Contradictory or out-of-range options."""

    exit_code = 2


class ModelNotFound(TranslateError):
    """No model under the given name or path."""

    exit_code = 3


class ModelError(TranslateError):
    """A model directory exists but something in it is missing or inconsistent."""

    exit_code = 4


class DeviceError(TranslateError):
    """The requested device is not available here."""

    exit_code = 5


class DataError(TranslateError):
    """Training or evaluation data that cannot be read or does not line up."""

    exit_code = 6
