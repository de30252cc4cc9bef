"""Small pictures of large uploads for the console's lists (pure: bytes in, bytes out).

Only uploads that were accepted get here, so the image opened and passed the pixel limits once
already. A picture already no larger than the thumbnail is shown as it is (scaled up by the
browser, pixelated), so only larger ones need one.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

THUMBNAIL_PX = 112  # twice the list's 56 CSS px, for high-density screens


def needs_thumbnail(width: int, height: int) -> bool:
    return max(width, height) > THUMBNAIL_PX


def thumbnail_if_large(original: bytes) -> tuple[bytes, str] | None:
    """The thumbnail of a picture larger than one; None for a small one (it is its own)."""
    with Image.open(io.BytesIO(original)) as image:
        if not needs_thumbnail(*image.size):
            return None
    return thumbnail(original)


def thumbnail(original: bytes) -> tuple[bytes, str]:
    """A PNG at most THUMBNAIL_PX on its longer side, upright (EXIF orientation applied)."""
    with Image.open(io.BytesIO(original)) as image:
        image.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))  # JPEG: decode at a reduced scale
        small = ImageOps.exif_transpose(image)
        small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
        if small.mode not in ("RGB", "RGBA", "L", "LA"):
            small = small.convert("RGBA" if "A" in small.getbands() or "transparency" in small.info else "RGB")
        out = io.BytesIO()
        small.save(out, format="PNG", optimize=False)
    return out.getvalue(), "image/png"
