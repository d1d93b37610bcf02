"""Errors that mean the user asked for something that cannot be done; the CLI prints them as one line."""


class AlldetectError(Exception):
    """Base class: a user-facing problem with a message that says what to do."""


class DataError(AlldetectError):
    """Input data (folders, manifests, images, predictions) cannot be used as given."""


class ImageProblem(DataError):
    """One image file cannot be used; ``path`` names it and ``reason`` says why."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
