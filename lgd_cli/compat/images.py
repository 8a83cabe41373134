"""Reading images for training, evaluation and prediction: any Pillow mode, EXIF-oriented, 8-bit out.

detectron2's `read_image` applies the EXIF orientation and converts to RGB/BGR, but Pillow's
conversion of 16-bit images ("I;16", "I") clips every value above 255: a 16-bit PNG comes out
almost white. `read_image` here scales such images to 8 bits first; everything else is unchanged.
`install()` puts it in place of detectron2's, so its DatasetMapper reads through it.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale as 8-bit "L" (full range kept); other modes as they are."""
    if image.mode not in _WIDE_MODES:
        return image
    values = np.asarray(image)
    if image.mode == "F":
        values = values * 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else values
        scaled = np.nan_to_num(values).clip(0, 255)
    elif image.mode.startswith("I;16") or values.max(initial=0) > 255:
        scaled = values.astype(np.int64).clip(0, 65535) >> 8  # 16-bit range -> 8-bit
    else:
        scaled = values.clip(0, 255)  # mode "I" that holds 8-bit values
    return Image.fromarray(scaled.astype(np.uint8), "L")


def read_image(file_name, format=None):
    """detectron2's `read_image` (same arguments and result), with 16-bit images scaled, not clipped."""
    from detectron2.data import detection_utils as utils
    from detectron2.utils.file_io import PathManager

    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image = utils._apply_exif_orientation(image)
        return utils.convert_PIL_to_numpy(to_8bit(image), format)


def install() -> None:
    """Make detectron2 (its DatasetMapper, and `read_image` imported after this) use `read_image` above."""
    from detectron2.data import detection_utils

    if detection_utils.read_image is not read_image:
        detection_utils._detectron2_read_image = detection_utils.read_image
        detection_utils.read_image = read_image


def image_problem(file_name: str) -> str | None:
    """Why an image file cannot be decoded, or None when it can."""
    try:
        read_image(file_name, "BGR")
    except FileNotFoundError:
        return "does not exist"
    except UnidentifiedImageError:
        return "is not an image file Pillow can read"
    except Exception as exc:  # truncated (OSError), broken chunks (SyntaxError), decompression bomb...
        return f"cannot be decoded ({str(exc).strip() or type(exc).__name__})"
    return None
