"""Uploaded image bytes -> the model's input tensor. Pure: Pillow, numpy, msgspec, stdlib only.

The tensor is a function of (bytes, PreprocessSpec, Pillow version) alone, so an auditor can
recompute it bit for bit from the stored original and compare its sha256 with the recorded one.

Pipeline, in this order:

1. Open with an allow-list of formats (`PreprocessSpec.formats`). Bytes no allowed decoder
   recognises are refused as `unsupported_format`; bytes that carry an allowed format's signature
   but do not parse are refused as `undecodable_image`.
2. Check width * height against `max_pixels` *before* decoding (Pillow itself only raises at
   twice its own limit), and refuse zero-sized images (`image_too_large`, `empty_image`). A
   WebP's declared size is checked before Pillow even opens it: its decoder allocates the canvas
   while opening.
3. Decode the first frame only (animated GIF/PNG/WebP, multi-page TIFF).
4. Apply the EXIF orientation tag, so the tensor shows the picture the way a viewer shows it.
5. Normalise the pixel data to 8 bits per channel:
   - `1` -> 0 / 255; `P`, `PA` -> RGB(A) through the palette, honouring its transparency;
     `L`/`RGB` with a transparent colour key (`transparency` info) -> LA / RGBA.
   - 16-bit (`I;16`, `I;16B`, `I;16L`, `I;16N`) -> round(v * 255 / 65535), i.e. the full
     0..65535 range maps onto 0..255 (no clipping at 255). `I` (32-bit) is taken to hold 16-bit
     data (that is what Pillow produces it from) and is clipped to 0..65535 first.
   - `F` (float) follows Pillow's own convention for converting it to `L`: values are already
     on the 0..255 scale; they are rounded half to even and clipped (NaN -> 0).
   - `CMYK`, `YCbCr`, `HSV`, `LAB`, `RGBX` -> RGB with Pillow's conversions.
6. Composite any alpha channel onto a uniform gray `background` (0 = black, matching MNIST's
   white-on-black digits): out = (c * a + background * (255 - a) + 127) // 255, in integers.
7. Convert to the model's channels: C=1 -> `L` (Pillow's ITU-R 601-2 luma,
   L = R*299/1000 + G*587/1000 + B*114/1000), C=3 -> `RGB` (gray is replicated).
8. Resize to (width, height) with the spec's Pillow resampling filter, in 8 bits (Pillow's fixed
   point arithmetic, deterministic). Aspect ratio is not preserved.
9. Scale (`scale="divide_255"`, the only scale defined): tensor = float32(pixel) / float32(255),
   an IEEE-754 correctly rounded division, so every value lies in [0, 1] and 0 and 255 map
   exactly to 0.0 and 1.0. The array is float32, shape (H, W, C), C-contiguous;
   `tensor_sha256` is the sha256 of its little-endian bytes.

Memory: steps 4 to 7 act on each pixel alone (or only move it), so they run on strips of rows
(`STRIP_PIXELS`) written into one image in the model's mode; the result is bit for bit the
whole-image one. At full resolution only the decoded frame (Pillow: 1, 2 or 4 bytes a pixel) and
that image (1 or 4 bytes a pixel) exist, plus the decoder's own buffers: libwebp's two canvases and
a copy of the frame make WebP the costliest, 16 bytes a pixel. `max_pixels` defaults to
`MEMORY_BUDGET_BYTES // WORST_BYTES_PER_PIXEL`. JPEG `draft` and `reduce` are not used: they
would change the tensor of every image larger than the model's input, and with it what
`reproduce` recomputes for predictions already in a log.
"""

from __future__ import annotations

import hashlib
import io
from typing import Final

import msgspec
import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from domain.events import ImageFacts
from domain.rejections import Rejected

RESAMPLING: Final[dict[str, Image.Resampling]] = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
SCALES: Final = ("divide_255",)

# One decode's peak memory at the largest accepted image (measured: README, "Memory").
MEMORY_BUDGET_BYTES: Final = 256 * 1024 * 1024
WORST_BYTES_PER_PIXEL: Final = 16  # an RGBA WebP; PNG, TIFF, BMP, GIF and JPEG take about 8 at most

# Leading bytes of the formats we may allow: they tell "an allowed format, but broken" from
# "not an allowed image at all" when Pillow cannot identify the bytes, and give a stored
# original its Content-Type.
_SIGNATURES: Final[dict[str, tuple[bytes, ...]]] = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
    "WEBP": (b"RIFF",),  # bytes 8..12 are "WEBP"; checked below
}


class PreprocessSpec(msgspec.Struct, frozen=True):
    """Everything that determines the tensor; recorded with every prediction."""

    height: int
    width: int
    channels: int
    resample: str = "bilinear"
    scale: str = "divide_255"
    background: int = 0
    max_pixels: int = MEMORY_BUDGET_BYTES // WORST_BYTES_PER_PIXEL  # 16,777,216 (4096 x 4096)
    formats: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")

    def __post_init__(self) -> None:
        # A bad spec is a configuration bug, so it fails loudly at construction, not per request.
        if self.height < 1 or self.width < 1:
            raise ValueError(f"model input size must be positive, got {self.height}x{self.width}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.resample not in RESAMPLING:
            raise ValueError(f"resample must be one of {sorted(RESAMPLING)}, got {self.resample!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if not 0 <= self.background <= 255:
            raise ValueError(f"background must be a gray level 0..255, got {self.background}")
        if self.max_pixels < 1:
            raise ValueError("max_pixels must be positive")
        Image.init()
        unknown = [name for name in self.formats if name.upper() not in Image.OPEN]
        if unknown or not self.formats:
            raise ValueError(f"formats must be Pillow format names, unknown: {unknown}")


class Preprocessed(msgspec.Struct):
    array: np.ndarray  # float32 (H, W, C), C-contiguous
    tensor_sha256: str
    image: ImageFacts
    spec: PreprocessSpec


def tensor_digest(array: np.ndarray) -> str:
    """sha256 of the tensor's little-endian float32 bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes()).hexdigest()


class OpenedImage:
    """An upload whose header parsed and whose size passed the checks; nothing decoded yet.

    Opening is cheap (the header only) and tells what decoding will cost, so a caller can decide
    where to decode (on its own thread for a small image, elsewhere for a large one).
    """

    __slots__ = ("image", "width", "height")

    def __init__(self, image: Image.Image, width: int, height: int) -> None:
        self.image, self.width, self.height = image, width, height

    @property
    def pixels(self) -> int:
        return self.width * self.height


def preprocess(data: bytes, spec: PreprocessSpec) -> Preprocessed:
    """Decode, normalise and resize `data` for a model described by `spec`.

    Raises Rejected for anything that is not an acceptable image.
    """
    return decode_opened(open_image(data, spec), spec)


def open_image(data: bytes, spec: PreprocessSpec) -> OpenedImage:
    """Steps 1 and 2: identify the format and check the declared size. Raises Rejected."""
    declared = _webp_canvas_size(data) if "WEBP" in (name.upper() for name in spec.formats) else None
    if declared is not None:
        _check_size(*declared, spec)
    image = _open(data, spec)
    try:
        width, height = _check_size(*image.size, spec)
    except BaseException:
        image.close()
        raise
    return OpenedImage(image, width, height)


def decode_opened(opened: OpenedImage, spec: PreprocessSpec) -> Preprocessed:
    """Steps 3 to 9 on an image from `open_image`, which this closes. Raises Rejected."""
    image = opened.image
    with image:
        info = _describe(image, opened.width, opened.height)
        try:
            image.seek(0)
            pixels = _to_model_pixels(image, spec)
        except Rejected:
            raise
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure here is caused by the bytes
            raise Rejected("undecodable_image", f"the {info.format} image could not be decoded: {exc}") from exc
    array = pixels.astype(np.float32) / np.float32(255.0)
    array = np.ascontiguousarray(array.reshape(spec.height, spec.width, spec.channels))
    return Preprocessed(array=array, tensor_sha256=tensor_digest(array), image=info, spec=spec)


def _open(data: bytes, spec: PreprocessSpec) -> Image.Image:
    allowed = ", ".join(spec.formats)
    if not data:
        raise Rejected("unsupported_format", f"the upload is empty; allowed formats: {allowed}")
    try:
        return Image.open(io.BytesIO(data), formats=spec.formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected("image_too_large", f"the image is too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        if sniff_format(data, spec.formats) is not None:
            raise Rejected("undecodable_image", "the image header could not be parsed") from exc
        raise Rejected("unsupported_format", f"the upload is not an image in an allowed format ({allowed})") from exc
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - an allowed decoder accepted the signature, then failed
        raise Rejected("undecodable_image", f"the image could not be parsed: {exc}") from exc


def sniff_format(data: bytes, formats: tuple[str, ...] | None = None) -> str | None:
    """The format whose signature `data` starts with (PNG, JPEG, GIF, BMP, TIFF, WEBP), else None.

    Leading bytes only, nothing is decoded: good for a Content-Type, not a promise it decodes.
    """
    for name in formats or tuple(_SIGNATURES):
        name = name.upper()
        for signature in _SIGNATURES.get(name, ()):
            if data.startswith(signature) and (name != "WEBP" or data[8:12] == b"WEBP"):
                return name
    return None


def _webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """The canvas size a WebP header declares (VP8X extended, VP8L lossless, VP8 lossy), else None."""
    if not (data.startswith(b"RIFF") and data[8:12] == b"WEBP") or len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _check_size(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int]:
    if width < 1 or height < 1:
        raise Rejected("empty_image", f"the image has no pixels ({width}x{height})")
    if width * height > spec.max_pixels:
        raise Rejected(
            "image_too_large",
            f"the image is {width}x{height} = {width * height} pixels; the limit is {spec.max_pixels}",
        )
    return width, height


def _describe(image: Image.Image, width: int, height: int) -> ImageFacts:
    try:
        # Counting frames may parse the whole file (GIF, TIFF): part of decoding, not of opening.
        frames = int(getattr(image, "n_frames", 1))
    except Exception as exc:  # noqa: BLE001 - counting frames parses the whole file
        raise Rejected("undecodable_image", f"the image could not be parsed: {exc}") from exc
    return ImageFacts(format=str(image.format), mode=image.mode, width=width, height=height, frames=frames)


def _to_model_pixels(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Decoded frame -> uint8 array (H, W) or (H, W, 3) at the model's size.

    Steps 5 to 7 are per pixel and step 4 only moves pixels, so they run a strip of rows at a
    time into one image in the model's mode: at full resolution nothing but the decoded frame and
    that image exists (no wider copy), and the result is bit for bit the whole-image one.
    """
    image.load()
    target_mode = "L" if spec.channels == 1 else "RGB"
    method = _TRANSPOSITIONS.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    if method is None and image.mode == target_mode and "transparency" not in image.info:
        upright = image
    else:
        upright = _normalise_in_strips(image, method, target_mode, spec.background)
    if upright.size != (spec.width, spec.height):
        upright = upright.resize((spec.width, spec.height), RESAMPLING[spec.resample])
    return np.asarray(upright, dtype=np.uint8)


# ImageOps.exif_transpose's table: EXIF orientation -> the transposition that shows the picture.
_TRANSPOSITIONS: Final[dict[int, Image.Transpose]] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES: Final = frozenset(
    {Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90}
)
# Where a strip of source rows [top, bottom) lands once transposed: rows become columns when the
# axes swap, and the order reverses for the transpositions that flip vertically (or turn clockwise).
_FROM_THE_END: Final = frozenset(
    {Image.Transpose.ROTATE_180, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_270,
     Image.Transpose.TRANSVERSE}
)
STRIP_PIXELS: Final = 1 << 18  # pixels per strip: bounds the scratch memory of steps 4 to 7


def _normalise_in_strips(
    image: Image.Image, method: Image.Transpose | None, target_mode: str, background: int
) -> Image.Image:
    width, height = image.size
    out = Image.new(target_mode, (height, width) if method in _SWAPS_AXES else (width, height))
    rows = max(1, STRIP_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        strip = _normalise(image.crop((0, top, width, bottom)), target_mode, background)
        if method is not None:
            strip = strip.transpose(method)
        offset = height - bottom if method in _FROM_THE_END else top
        out.paste(strip, (offset, 0) if method in _SWAPS_AXES else (0, offset))
    return out


def _normalise(image: Image.Image, target_mode: str, background: int) -> Image.Image:
    """Steps 5 to 7 on any Pillow mode (a crop keeps the palette and `transparency`)."""
    image = _to_8bit(image)
    if image.mode in ("LA", "RGBA"):
        image = _composite(image, background)
    return image if image.mode == target_mode else image.convert(target_mode)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> one of L, LA, RGB, RGBA with 8 bits per channel."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image.convert(mode + "A") if "transparency" in image.info else image
    if mode in ("LA", "RGBA"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        return image.convert("RGBA" if has_alpha else "RGB")
    if mode == "La":
        return image.convert("LA")
    if mode == "RGBa":
        return image.convert("RGBA")
    if mode.startswith("I;16"):
        # Byte order is the mode's business; numpy reads it with the right dtype.
        return _gray_from_16bit(np.asarray(image).astype(np.uint32))
    if mode == "I":
        return _gray_from_16bit(np.clip(np.asarray(image, dtype=np.int64), 0, 65535).astype(np.uint32))
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    try:
        # CMYK, YCbCr, HSV, LAB, RGBX: Pillow's own conversions.
        return image.convert("RGB")
    except ValueError as exc:
        raise Rejected("unsupported_mode", f"pixel mode {mode} is not supported") from exc


def _gray_from_16bit(values: np.ndarray) -> Image.Image:
    # Integer rounding of v * 255 / 65535 (= v / 257): exact and platform independent.
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


def _composite(image: Image.Image, background: int) -> Image.Image:
    """Flatten LA / RGBA onto a uniform gray, in 8 bits: Pillow's masked paste computes
    (c * a + background * (255 - a) + 127) // 255 exactly (a test checks every c, a, background)."""
    flat_mode = image.mode[:-1]
    flat = Image.new(flat_mode, image.size, (background,) * len(flat_mode))
    flat.paste(image if flat_mode == "RGB" else image.convert("L"), mask=image.getchannel("A"))
    return flat
