"""Uploaded image bytes -> the model's input tensor. Pure: Pillow, numpy, msgspec, stdlib only.

The tensor is a function of (bytes, PreprocessSpec, Pillow version) alone, so an auditor can
recompute it bit for bit from the stored original and compare its sha256 with the recorded one.

Pipeline, in this order:

1. Open with an allow-list of formats (`PreprocessSpec.formats`). Bytes no allowed decoder
   recognises are refused as `unsupported_format`; bytes that carry an allowed format's signature
   but do not parse are refused as `undecodable_image`.
2. Check width * height against `max_pixels` *before* decoding (Pillow itself only raises at
   twice its own limit), and refuse zero-sized images (`image_too_large`, `empty_image`).
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
"""

from __future__ import annotations

import hashlib
import io
from typing import Final

import msgspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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
    max_pixels: int = 40_000_000
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
    image = _open(data, spec)
    try:
        width, height = _check_size(image, spec)
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
            ImageOps.exif_transpose(image, in_place=True)
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


def _check_size(image: Image.Image, spec: PreprocessSpec) -> tuple[int, int]:
    width, height = image.size
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
    """Decoded frame -> uint8 array (H, W) or (H, W, 3) at the model's size."""
    image = _to_8bit(image)
    if image.mode in ("LA", "RGBA"):
        image = _composite(image, spec.background)
    target_mode = "L" if spec.channels == 1 else "RGB"
    if image.mode != target_mode:
        image = image.convert(target_mode)
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), RESAMPLING[spec.resample])
    return np.asarray(image, dtype=np.uint8)


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
    """Flatten LA / RGBA onto a uniform gray, in integer arithmetic."""
    pixels = np.asarray(image, dtype=np.uint32)
    color, alpha = pixels[..., :-1], pixels[..., -1:]
    flat = (color * alpha + background * (255 - alpha) + 127) // 255
    flat = flat.astype(np.uint8)
    if image.mode == "LA":
        return Image.fromarray(flat[..., 0])
    return Image.fromarray(flat)

