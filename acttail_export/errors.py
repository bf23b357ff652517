"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class ActTailError(Exception):
    """Bad input or an unrecoverable condition the user can fix; the message names the fix."""


class ExportValidationError(ActTailError):
    """The exported ONNX model disagrees with the PyTorch sparse reference beyond tolerance."""
