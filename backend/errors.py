"""Domain errors. Every error the user can cause derives from :class:`AVFaceError` and
carries a stable ``code`` that the CLI turns into an exit status and the service puts on
the wire (docs/protocol.md lists them)."""
from __future__ import annotations


class AVFaceError(Exception):
    """Base class: ``code`` is stable and machine-readable, the message says what is wrong
    and what to do about it."""

    code = "avface_error"
    exit_status = 1

    def __init__(self, message: str, *, detail: str | None = None):
        super().__init__(message)
        self.message = message
        #: Extra diagnostic text (for example ffmpeg's stderr), kept out of the one-line message.
        self.detail = detail

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


class InputError(AVFaceError):
    """Bad arguments or options."""

    code = "bad_input"
    exit_status = 2


class MediaError(AVFaceError):
    """The file is not a readable video/audio file, is truncated, or has no usable stream."""

    code = "bad_media"
    exit_status = 3


class NoFaceError(AVFaceError):
    """No face was detected in any frame."""

    code = "no_face"
    exit_status = 4
    DEFAULT_MESSAGE = ("no face was detected in any frame; check that the clip shows a face turned towards the "
                       "camera, large enough (at least about 80 pixels across) and lit")

    def __init__(self, message: str = DEFAULT_MESSAGE, *, detail: str | None = None):
        super().__init__(message, detail=detail)


class ModelFileError(AVFaceError):
    """A required model file (FLAME, the MediaPipe task bundle, a checkpoint) is missing or
    malformed."""

    code = "model_file"
    exit_status = 5


class OutputError(AVFaceError):
    """The output folder cannot be created or written."""

    code = "output"
    exit_status = 6


class SchemaError(AVFaceError):
    """A result file does not follow the result contract (docs/design.md section 5, backend/result/)."""

    code = "bad_result"
    exit_status = 7


class CancelledError(AVFaceError):
    """The job was cancelled by the user."""

    code = "cancelled"
    exit_status = 130
