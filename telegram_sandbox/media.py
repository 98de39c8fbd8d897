"""Files: uploads from multipart bodies, files kept for a bot, and the sizes of photos.

Upload is what a multipart file field becomes (the HTTP server makes it, the spec accepts it as
an InputFile, the Bot API stores it); StoredFile is what getFile and /file/bot... serve;
image_size reads a PNG, GIF or JPEG header and scaled_sides gives the PhotoSize list Telegram
keeps of a photo.

Imports only the standard library, nothing of the package.
"""

import dataclasses
import struct

PHOTO_SIDES = (90, 320, 800, 1280)
PHOTO_MAX_SIDE = 2560
URL_PHOTO_SIZE = (800, 600)  # a photo sent by URL is not fetched (offline): its assumed size


@dataclasses.dataclass(frozen=True)
class Upload:
    """A file sent in a multipart body."""

    filename: str
    content_type: str
    data: bytes


@dataclasses.dataclass
class StoredFile:
    """A file the sandbox keeps for a bot; data is None for photos sent by URL."""

    file_id: str
    file_unique_id: str
    data: bytes | None
    path: str | None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, GIF or JPEG image, None if it is none of them."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    index = 2
    while index + 9 <= len(data):
        if data[index] != 0xFF:
            return None
        marker = data[index + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[index + 5:index + 9])
            return width, height
        (length,) = struct.unpack(">H", data[index + 2:index + 4])
        index += 2 + length
    return None


def scaled_sides(width: int, height: int) -> list[tuple[int, int]]:
    """The sizes Telegram keeps of a photo: thumbnails under each side limit, then the photo."""
    longest = max(width, height)
    sides = [side for side in PHOTO_SIDES if side < longest] + [min(longest, PHOTO_MAX_SIDE)]
    return [(max(1, round(width * side / longest)), max(1, round(height * side / longest)))
            for side in sides]
