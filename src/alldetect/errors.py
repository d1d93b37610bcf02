"""Errors that mean the user asked for something that cannot be done; the CLI prints them as one line."""

import importlib.util
import re

# pip extras: what each one adds (pyproject.toml's optional dependencies), by the modules it installs
EXTRAS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "serve": ("fastapi", "uvicorn", "multipart"),
          "explain": ("pytorch_grad_cam",), "augment": ("kornia", "albumentations"), "cluster": ("submitit",)}


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


class MissingExtra(AlldetectError):
    """A part of alldetect that an optional install adds was asked for without it."""


def has_extra(extra: str) -> bool:
    """Whether every module of the pip extra ``extra`` can be imported."""
    return all(importlib.util.find_spec(module) is not None for module in EXTRAS[extra])


def require_extra(extra: str, what: str) -> None:
    """Raise ``MissingExtra``, in one line naming the extra to install, unless ``extra`` is installed."""
    missing = [module for module in EXTRAS[extra] if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingExtra(f"{what} needs alldetect's '{extra}' extra ({', '.join(missing)} not installed): "
                           f"pip install 'alldetect[{extra}]'")


def first_line(error: BaseException) -> str:
    """A library's message as one line: its first, without terminal colour codes, at most 160 characters; the
    exception's type when it has no message.

    >>> first_line(RuntimeError("\\x1b[31mbad\\x1b[0m magic number\\nmore"))
    'bad magic number'
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return (text.splitlines() or [type(error).__name__])[0][:160]
