"""Reading image files that data names (annotation records, benchmark questions): bounded in time, bytes and
pixels, whatever is at the path.

`read_image_file` opens regular files only: a FIFO would block the reader forever, a device could stream
without end, a socket or directory is no image; the file type is checked with `os.stat` before any open,
and the open itself is non-blocking and refuses a symlink in the last component (the path is resolved
first), so a file swapped for a FIFO or a link in between fails instead of hanging. At most `max_bytes`
are read. With `root`, a path whose real location is outside `root` (through a symlink) is refused
unless `follow_outside_root`. `decode_image` refuses more than `max_pixels` from the header, before any
pixel is decoded (decompression bombs: a small file declaring a huge image).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

MAX_IMAGE_BYTES = 64 << 20  # far above any LLaVA / benchmark image (JPEG / PNG of a few megapixels)

# Reasons an image is refused (`ImageFileError.reason`).
MISSING, NOT_REGULAR, OUTSIDE_ROOT, TOO_LARGE, CORRUPT = "missing", "not_regular", "outside_root", "too_large", "corrupt"


class ImageFileError(ValueError):
    """An image file that cannot be used; `reason` is one of the constants above, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


def read_image_file(path: str | os.PathLike, *, max_bytes: int = MAX_IMAGE_BYTES, root: str | os.PathLike | None = None,
                    follow_outside_root: bool = False) -> bytes:
    """The bytes of the regular file at `path` (at most `max_bytes`). Raises ImageFileError: MISSING (no
    such file, or unreadable), NOT_REGULAR (FIFO, socket, device, directory), OUTSIDE_ROOT (resolves
    outside `root`), TOO_LARGE (more than `max_bytes`)."""
    path = Path(path)
    try:
        st = os.stat(path)  # follows symlinks: the type of what would be opened
    except OSError as e:
        raise ImageFileError(MISSING, f"{path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageFileError(NOT_REGULAR, f"{path} is a {_kind(st.st_mode)}, not a regular file")
    real = os.path.realpath(path)
    if root is not None and not follow_outside_root:
        root_real = os.path.realpath(root)
        if os.path.commonpath([real, root_real]) != root_real:
            raise ImageFileError(OUTSIDE_ROOT, f"{path} resolves to {real}, outside the image root {root_real} (a "
                                               "symlink leaving the root; allow it with the follow-symlinks switch)")
    if st.st_size > max_bytes:
        raise ImageFileError(TOO_LARGE, f"{path} has {st.st_size} bytes > max_image_bytes={max_bytes}")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink appeared at the resolved path since stat
            raise ImageFileError(NOT_REGULAR, f"{path} changed into a symlink while being opened") from None
        raise ImageFileError(MISSING, f"{path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)  # what was actually opened
        if not stat.S_ISREG(st.st_mode):
            raise ImageFileError(NOT_REGULAR, f"{path} is a {_kind(st.st_mode)}, not a regular file")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ImageFileError(MISSING, f"{path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if size > max_bytes:
        raise ImageFileError(TOO_LARGE, f"{path} grew past max_image_bytes={max_bytes} while being read")
    return b"".join(chunks)


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Open encoded image bytes (header only: PIL decodes lazily) and refuse more than `max_pixels`
    pixels before any is decoded. Raises ImageFileError TOO_LARGE, or CORRUPT when the bytes are no image
    PIL can read. The caller decodes (`load()`, `convert`), where a truncated file fails."""
    from PIL import Image

    with warnings.catch_warnings():
        # Our own pixel limit applies; PIL's DecompressionBombWarning would only repeat it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageFileError(TOO_LARGE, str(e)) from None
        except Exception as e:  # PIL raises many types on bad data (OSError, SyntaxError, ValueError, ...)
            raise ImageFileError(CORRUPT, f"{type(e).__name__}: {e}") from None
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ImageFileError(TOO_LARGE, f"{width}x{height} = {width * height} pixels > max_image_pixels={max_pixels}")
    return img


__all__ = ["CORRUPT", "MAX_IMAGE_BYTES", "MISSING", "NOT_REGULAR", "OUTSIDE_ROOT", "TOO_LARGE", "ImageFileError",
           "decode_image", "read_image_file"]
