"""Error vocabulary: every case that is not `ok` carries one of these codes and a human message.

The list is finite and documented: curation teams filter the catalog on it, and ops alert on it.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Why a case was skipped or failed. Values are what the catalog stores."""

    # -- input objects that are not (usable) images -------------------------------------------
    NOT_DICOM = "not_dicom"  # content is neither DICOM nor a supported image / NIfTI format
    UNSUPPORTED_FORMAT = "unsupported_format"  # recognised container, but not one we segment
    NON_IMAGE_OBJECT = "non_image_object"  # DICOM SR, RTSTRUCT, SEG, PR, RT plan/dose, DICOMDIR...
    NO_PIXEL_DATA = "no_pixel_data"  # an image-like object without pixel data
    # -- broken bytes ----------------------------------------------------------------------------
    UNREADABLE = "unreadable"  # the object could not be read from storage (permissions, I/O, a short read)
    EMPTY_OBJECT = "empty_object"  # the object holds 0 bytes
    TRUNCATED = "truncated"  # the file ends before its declared content does
    DECODE_ERROR = "decode_error"  # header or pixel data present but cannot be decoded
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"  # no installed decoder for it
    # -- series assembly -------------------------------------------------------------------------
    INCONSISTENT_SERIES = "inconsistent_series"  # mixed sizes / orientations that cannot be split
    DUPLICATE_POSITION = "duplicate_position"  # two slices at the same position, different pixels
    DUPLICATE_INSTANCE = "duplicate_instance"  # another copy of a SOP instance already in the case list
    LOCALIZER = "localizer"  # scout / localizer images split off a series
    # -- volumes ---------------------------------------------------------------------------------
    UNSUPPORTED_DIMENSIONS = "unsupported_dimensions"  # e.g. 5D NIfTI, 4D with several volumes
    BAD_GEOMETRY = "bad_geometry"  # an affine with NaN / infinite entries or a zero voxel size
    TOO_LARGE = "too_large"  # slices or a volume past the configured limits (resources.max_*)
    # -- segmentation stages (issue 3+) ----------------------------------------------------------
    EMPTY_SALIENCY = "empty_saliency"  # the coarse mask from the saliency map is empty
    MODEL_ERROR = "model_error"  # a model stage raised on this case
    OUT_OF_MEMORY = "out_of_memory"  # a model ran out of (GPU) memory on this slice, even alone in its batch
    INTERNAL_ERROR = "internal_error"  # a bug: anything not classified above


# Failures of the moment, not of the case: storage errors past the client's retries, memory taken by
# other work. The next runs retry them without --retry-failed, up to failure_budget.transient_attempts
# attempts in all; then they stay, with their history (outputs/retries.py).
TRANSIENT_CODES = frozenset({ErrorCode.UNREADABLE, ErrorCode.OUT_OF_MEMORY})


class CaseError(Exception):
    """A problem with one input case: becomes a failure (or skip) row, never a crashed job.

    Raise with the input named and the reason stated, chaining the cause:
        raise CaseError(f"{uri}: no pixel data", code=ErrorCode.NO_PIXEL_DATA) from e
    """

    def __init__(self, message: str, *, code: ErrorCode | str):
        super().__init__(message)
        self.code = ErrorCode(code)

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(ValueError):
    """A bad job configuration or command-line argument (one-line message, exit code 2)."""
