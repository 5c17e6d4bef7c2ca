"""2D images (PNG, JPEG): the public benchmark datasets ship as PNG.

Geometry: an image is treated like an unrotated 2D DICOM image with 1 mm pixels: i along a row
(LPS +x), j down a column (LPS +y), so its RAS affine is diag(-1, -1, 1, 1).
"""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
from PIL import Image, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

from mcs_batch.errors import CaseError, ErrorCode
from mcs_batch.io.volume import LPS_TO_RAS, Volume
from mcs_batch.records import SPACING_ASSUMED, CaseKind, CaseRecord, make_case_id

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
IMAGE_AFFINE = LPS_TO_RAS.copy()
EIGHT_BIT_GREY = ("L", "LA", "1")  # PIL modes whose values reach the models as stored


def sniff_image(head: bytes) -> str | None:
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    return None


_READERS = {"png": PngImagePlugin.PngImageFile, "jpeg": JpegImagePlugin.JpegImageFile}
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def open_image(fileobj: BinaryIO) -> Image.Image:
    """PIL's reader of the format the magic bytes name, which reads the header only. Not `Image.open`:
    its decompression-bomb check would refuse a large image before our own limits
    (resources.max_image_pixels, applied from the header when cases are grouped) could say `too_large`."""
    kind = sniff_image(fileobj.read(8))
    fileobj.seek(0)
    if kind is None:
        raise UnidentifiedImageError("not a PNG or JPEG image")
    return _READERS[kind](fileobj)


def image_record(fileobj: BinaryIO, *, uri: str, rel: str) -> CaseRecord:
    """Case record from the image header (PIL reads only the header here)."""
    try:
        with open_image(fileobj) as im:
            width, height = im.size
            mode = im.mode
    except _DECODE_ERRORS as e:
        raise CaseError(f"{uri}: unreadable image header ({e})", code=ErrorCode.DECODE_ERROR) from e
    if width < 1 or height < 1:
        raise CaseError(f"{uri}: the image header declares a size of {width} x {height}", code=ErrorCode.DECODE_ERROR)
    return CaseRecord(
        case_id=make_case_id(f"file:{rel}"),
        kind=CaseKind.IMAGE,
        source_uris=[uri],
        source_keys=[rel],
        shape=[width, height, 1],
        spacing_mm=[1.0, 1.0, 1.0],
        affine=[float(v) for v in IMAGE_AFFINE.reshape(-1)],
        photometric="RGB" if mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr") else "MONOCHROME2",
        warnings=[f"2D image without physical spacing: {SPACING_ASSUMED}"],
    )


def load_image(data: bytes, *, uri: str) -> Volume:
    """Decode PNG/JPEG bytes: greyscale -> float32 [W, H, 1]; colour -> uint8 [W, H, 1, 3].

    8-bit greyscale (modes L, LA, 1; a bilevel image as 0 / 255, the alpha dropped) is marked
    `as_stored`: its values reach the models unchanged, as its RGB twin's do. 16-bit and float
    greyscale (I;16, I, F) is windowed (io/window.py).
    """
    try:
        with open_image(io.BytesIO(data)) as im:
            im.load()
            as_stored = im.mode in EIGHT_BIT_GREY
            if im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "PA"):
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
                array = np.ascontiguousarray(rgb.transpose(1, 0, 2)[:, :, None, :])
            else:
                gray = np.asarray(im.convert("L") if as_stored else im, dtype=np.float32)  # [H, W]
                array = np.ascontiguousarray(gray.T[:, :, None])
    except _DECODE_ERRORS as e:
        code = ErrorCode.TRUNCATED if "truncated" in str(e).lower() else ErrorCode.DECODE_ERROR
        raise CaseError(f"{uri}: cannot decode image ({e})", code=code) from e
    meta = {"source": "image", "as_stored": as_stored}
    return Volume(array=array, affine=IMAGE_AFFINE.copy(), modality="", meta=meta)
