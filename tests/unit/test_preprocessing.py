"""domain.preprocessing: every mode, orientation, frames, sizes, refusals, determinism."""

from __future__ import annotations

import hashlib
import io
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import msgspec
import numpy as np
import pytest
from PIL import Image, ImageFile

from domain.preprocessing import PreprocessSpec, Preprocessed, preprocess, sniff_format
from domain.rejections import Rejected
from tests.fixtures import DIGITS

GRAY = PreprocessSpec(height=28, width=28, channels=1)
RGB = PreprocessSpec(height=28, width=28, channels=3)
REPO = Path(__file__).resolve().parents[2]


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def gray_levels(result: Preprocessed) -> np.ndarray:
    """The tensor back on the 0..255 scale (exact: the scale is a division by 255)."""
    return np.rint(result.array[..., 0] * 255).astype(np.int64)


def assert_well_formed(result: Preprocessed, spec: PreprocessSpec) -> None:
    array = result.array
    assert array.shape == (spec.height, spec.width, spec.channels)
    assert array.dtype == np.float32
    assert array.flags.c_contiguous
    assert 0.0 <= array.min() and array.max() <= 1.0
    assert result.tensor_sha256 == hashlib.sha256(array.tobytes()).hexdigest()
    assert result.spec == spec


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries a few bytes of data: a cheap bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# --- modes ------------------------------------------------------------------------------------


def test_mode_L_keeps_gray_levels_exactly():
    pixels = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) % 256
    result = preprocess(encode(Image.fromarray(pixels.astype(np.uint8))), GRAY)
    assert_well_formed(result, GRAY)
    assert result.image.mode == "L" and result.image.format == "PNG"
    np.testing.assert_array_equal(gray_levels(result), pixels)
    # The documented scale: float32(x) / 255, so 0 and 255 are exactly 0.0 and 1.0.
    expected = pixels.astype(np.float32) / np.float32(255.0)
    np.testing.assert_array_equal(result.array[..., 0], expected)


def test_mode_1_maps_to_black_and_white():
    image = Image.new("1", (28, 28), 0)
    image.paste(1, (0, 0, 14, 28))
    result = preprocess(encode(image), GRAY)
    assert result.image.mode == "1"
    assert result.array[0, 0, 0] == 1.0 and result.array[0, 27, 0] == 0.0


def test_mode_P_without_transparency_uses_the_palette():
    image = Image.new("P", (28, 28), 0)
    image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    image.paste(1, (0, 0, 28, 10))
    result = preprocess(encode(image), GRAY)
    assert result.image.mode == "P"
    assert result.array[0, 0, 0] == 1.0 and result.array[27, 0, 0] == 0.0


def test_mode_P_with_transparency_shows_the_background():
    image = Image.new("P", (28, 28), 1)
    image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    image.paste(0, (0, 0, 28, 10))  # index 0 becomes transparent
    data = encode(image, transparency=0)
    on_white = PreprocessSpec(28, 28, 1, background=255)
    assert preprocess(data, on_white).array.min() == 1.0  # transparent -> white, rest white
    on_black = preprocess(data, GRAY)
    assert on_black.array[0, 0, 0] == 0.0 and on_black.array[27, 0, 0] == 1.0


def test_mode_LA_composites_alpha_onto_the_background():
    image = Image.new("LA", (28, 28), (200, 128))
    result = preprocess(encode(image), GRAY)
    assert result.image.mode == "LA"
    assert gray_levels(result)[0, 0] == (200 * 128 + 0 * 127 + 127) // 255
    on_gray = preprocess(encode(image), PreprocessSpec(28, 28, 1, background=100))
    assert gray_levels(on_gray)[0, 0] == (200 * 128 + 100 * 127 + 127) // 255


def test_mode_RGB_to_gray_uses_pillow_luma_and_to_rgb_keeps_channels():
    image = Image.new("RGB", (28, 28), (255, 0, 0))
    data = encode(image)
    gray = preprocess(data, GRAY)
    assert gray_levels(gray)[0, 0] == np.asarray(image.convert("L"))[0, 0]
    color = preprocess(data, RGB)
    assert_well_formed(color, RGB)
    assert color.array[0, 0].tolist() == [1.0, 0.0, 0.0]


def test_gray_input_for_a_color_model_replicates_the_channel():
    result = preprocess(encode(Image.new("L", (5, 5), 255)), RGB)
    assert result.array.shape == (28, 28, 3) and result.array.min() == 1.0


def test_mode_RGBA_composites_alpha_onto_the_background():
    image = Image.new("RGBA", (28, 28), (255, 255, 255, 255))
    image.paste((255, 255, 255, 0), (0, 0, 28, 14))  # top half fully transparent
    result = preprocess(encode(image), GRAY)
    assert result.image.mode == "RGBA"
    assert result.array[0, 0, 0] == 0.0 and result.array[27, 0, 0] == 1.0
    white_background = preprocess(encode(image), PreprocessSpec(28, 28, 3, background=255))
    assert white_background.array.min() == 1.0


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_modes_scale_the_full_range_without_clipping(mode):
    values = np.array([0, 1000, 32768, 65535], dtype=np.uint16)
    pixels = np.resize(values, (28, 28)).astype(np.uint16)
    image = Image.new(mode, (28, 28))
    image.frombytes(pixels.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    data = encode(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    result = preprocess(data, GRAY)
    assert result.image.mode == mode
    expected = np.round(pixels.astype(np.float64) * 255 / 65535)
    np.testing.assert_array_equal(gray_levels(result), expected)
    assert gray_levels(result)[0, 1] == 4  # 1000 / 257: a low value is not clipped to white


def test_16_bit_png_is_scaled_too():
    image = Image.new("I;16", (28, 28), 65535)
    image.paste(257 * 100, (0, 0, 28, 14))
    result = preprocess(encode(image), GRAY)
    assert result.image.mode == "I;16"
    assert gray_levels(result)[0, 0] == 100 and gray_levels(result)[27, 0] == 255


def test_mode_I_is_taken_as_16_bit_and_clipped_to_it():
    image = Image.new("I", (28, 28), 70000)
    image.paste(-5, (0, 0, 28, 10))
    image.paste(257 * 10, (0, 10, 28, 20))
    levels = gray_levels(preprocess(encode(image, "TIFF"), GRAY))
    assert (levels[0, 0], levels[15, 0], levels[25, 0]) == (0, 10, 255)


def test_mode_F_follows_pillows_0_to_255_convention():
    image = Image.new("F", (28, 28), 300.0)
    image.paste(127.4, (0, 0, 28, 14))
    levels = gray_levels(preprocess(encode(image, "TIFF"), GRAY))
    assert levels[0, 0] == 127 and levels[27, 0] == 255


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_mode_CMYK_is_converted_to_rgb(fmt):
    image = Image.new("CMYK", (28, 28), (0, 0, 0, 0))  # no ink: white
    image.paste((0, 0, 0, 255), (0, 0, 28, 14))  # full black ink
    result = preprocess(encode(image, fmt, **({"quality": 100} if fmt == "JPEG" else {})), GRAY)
    assert result.image.mode == "CMYK"
    assert result.array[0, 0, 0] < 0.05 and result.array[27, 0, 0] > 0.95


def test_mode_YCbCr_is_converted_to_rgb():
    image = Image.new("RGB", (28, 28), (0, 0, 255)).convert("YCbCr")
    result = preprocess(encode(image, "TIFF"), RGB)
    assert result.image.mode == "YCbCr"
    red, green, blue = result.array[0, 0]
    assert blue > 0.9 and red < 0.1 and green < 0.1


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_every_allowed_format_decodes(fmt):
    image = Image.new("L", (40, 30), 0)
    image.paste(255, (10, 5, 30, 25))
    result = preprocess(encode(image, fmt), GRAY)
    assert_well_formed(result, GRAY)
    assert result.image.format == fmt
    assert result.array[14, 14, 0] > 0.9 and result.array[0, 0, 0] < 0.1


# --- geometry -----------------------------------------------------------------------------------


def asymmetric_image() -> tuple[Image.Image, np.ndarray]:
    """20 wide x 10 high, every pixel distinct, so any flip or rotation shows."""
    pixels = (np.arange(200).reshape(10, 20) + 20).astype(np.uint8)
    return Image.fromarray(pixels), pixels


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        (1, lambda a: a),
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),  # the camera was turned: show it rotated 90° clockwise
        (8, lambda a: np.rot90(a, 1)),
        (2, lambda a: a[:, ::-1]),
    ],
)
def test_exif_orientation_is_applied(orientation, expected):
    image, pixels = asymmetric_image()
    exif = Image.Exif()
    exif[0x0112] = orientation
    want = expected(pixels)
    spec = PreprocessSpec(height=want.shape[0], width=want.shape[1], channels=1)
    result = preprocess(encode(image, "PNG", exif=exif), spec)
    np.testing.assert_array_equal(gray_levels(result), want)
    assert (result.image.width, result.image.height) == (20, 10)  # as stored, before rotation


def test_exif_orientation_in_a_jpeg():
    image = Image.new("L", (40, 20), 0)
    image.paste(255, (0, 0, 10, 20))  # a bright band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise: the band ends up on top
    result = preprocess(encode(image, "JPEG", exif=exif, quality=95),
                        PreprocessSpec(height=40, width=20, channels=1))
    levels = gray_levels(result)
    assert levels[:8].mean() > 200 and levels[12:].mean() < 50


def test_animated_gif_uses_the_first_frame():
    first = Image.new("L", (28, 28), 0)
    first.paste(255, (0, 0, 14, 28))  # left half white
    second = Image.new("L", (28, 28), 0)
    second.paste(255, (14, 0, 28, 28))  # right half white
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    result = preprocess(data, GRAY)
    assert result.image.frames == 2
    assert result.array[10, 2, 0] == 1.0 and result.array[10, 25, 0] == 0.0


def test_animated_png_uses_the_first_frame():
    first = Image.new("RGB", (28, 28), (255, 255, 255))
    second = Image.new("RGB", (28, 28), (0, 0, 0))
    data = encode(first, "PNG", save_all=True, append_images=[second])
    result = preprocess(data, GRAY)
    assert result.image.frames == 2 and result.array.min() == 1.0


@pytest.mark.parametrize("size", [(1, 1), (1000, 37), (37, 1000), (3, 500)])
def test_any_size_is_resized_to_the_model_input(size):
    image = Image.new("L", size, 255)
    result = preprocess(encode(image), GRAY)
    assert_well_formed(result, GRAY)
    assert (result.image.width, result.image.height) == size
    assert result.array.min() == 1.0  # a uniform image stays uniform whatever the resampling


def test_resample_filter_is_part_of_the_spec():
    image, _ = asymmetric_image()
    data = encode(image)
    nearest = preprocess(data, PreprocessSpec(28, 28, 1, resample="nearest"))
    bilinear = preprocess(data, PreprocessSpec(28, 28, 1, resample="bilinear"))
    assert nearest.tensor_sha256 != bilinear.tensor_sha256


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"P5\n28 28\n255\n" + bytes(28 * 28), id="ppm"),
        pytest.param(encode(Image.new("RGB", (16, 16)), "ICO"), id="ico"),
        pytest.param(b"hello, this is not an image\n", id="text"),
        pytest.param(b"%PDF-1.7\n", id="pdf"),
        pytest.param(b"", id="empty"),
    ],
)
def test_formats_outside_the_allow_list_are_refused_as_unsupported(data):
    with pytest.raises(Rejected) as caught:
        preprocess(data, GRAY)
    assert caught.value.code == "unsupported_format"
    assert "allowed" in str(caught.value)


def test_the_allow_list_comes_from_the_spec():
    png_only = PreprocessSpec(28, 28, 1, formats=("PNG",))
    jpeg = encode(Image.new("L", (8, 8)), "JPEG")
    with pytest.raises(Rejected) as caught:
        preprocess(jpeg, png_only)
    assert caught.value.code == "unsupported_format"


def test_truncated_png_is_refused_as_undecodable():
    noise = np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)
    data = encode(Image.fromarray(noise))
    with pytest.raises(Rejected) as caught:
        preprocess(data[: len(data) // 2], GRAY)
    assert caught.value.code == "undecodable_image"


def test_broken_header_of_an_allowed_format_is_undecodable_not_unsupported():
    with pytest.raises(Rejected) as caught:
        preprocess(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, GRAY)
    assert caught.value.code == "undecodable_image"


def test_zero_width_image_is_refused_before_decoding():
    with pytest.raises(Rejected) as caught:
        preprocess(png_header_only(0, 10), GRAY)
    assert caught.value.code == "undecodable_image"  # Pillow itself refuses a 0-pixel header


@pytest.mark.parametrize(
    "size",
    [
        pytest.param((100_000, 100_000), id="beyond-pillows-own-limit"),
        pytest.param((7_000, 7_000), id="under-pillows-limit-over-ours"),
    ],
)
def test_decompression_bombs_are_refused_fast_without_decoding(size, monkeypatch):
    def no_decoding(self):
        raise AssertionError("the bomb's pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    data = png_header_only(*size)
    assert len(data) < 200
    started = time.perf_counter()
    with pytest.raises(Rejected) as caught:
        preprocess(data, GRAY)
    assert time.perf_counter() - started < 1.0
    assert caught.value.code == "image_too_large"


def test_max_pixels_is_the_specs():
    data = encode(Image.new("L", (100, 100)))
    with pytest.raises(Rejected) as caught:
        preprocess(data, PreprocessSpec(28, 28, 1, max_pixels=9_999))
    assert caught.value.code == "image_too_large"
    assert_well_formed(preprocess(data, PreprocessSpec(28, 28, 1, max_pixels=10_000)),
                       PreprocessSpec(28, 28, 1, max_pixels=10_000))


# --- determinism and records ---------------------------------------------------------------------


@pytest.mark.parametrize("spec", [GRAY, RGB], ids=["gray", "rgb"])
def test_same_bytes_give_the_same_tensor_bit_for_bit(spec):
    noise = np.random.default_rng(1).integers(0, 256, (57, 91, 4), dtype=np.uint8)
    data = encode(Image.fromarray(noise, "RGBA"))
    first, second = preprocess(data, spec), preprocess(data, spec)
    assert first.array.tobytes() == second.array.tobytes()
    assert first.tensor_sha256 == second.tensor_sha256


def test_fixture_digits_are_white_on_black_28x28():
    paths = sorted(DIGITS.glob("*.png"))
    assert len(paths) == 100
    for path in paths[:10]:
        result = preprocess(path.read_bytes(), GRAY)
        assert result.image.mode == "L" and (result.image.width, result.image.height) == (28, 28)
        assert result.array[0, 0, 0] == 0.0 and result.array.max() > 0.9


def test_spec_and_image_info_are_encodable_for_events():
    result = preprocess(encode(Image.new("L", (3, 3))), GRAY)
    spec_json = msgspec.json.encode(GRAY)
    assert msgspec.json.decode(spec_json, type=PreprocessSpec) == GRAY
    assert msgspec.json.decode(msgspec.json.encode(result.image), type=type(result.image)) == result.image


@pytest.mark.parametrize(
    "bad",
    [
        {"channels": 2},
        {"height": 0},
        {"resample": "sinc"},
        {"scale": "standardize"},
        {"background": 256},
        {"formats": ("PNG", "NOPE")},
    ],
)
def test_an_invalid_spec_fails_at_construction(bad):
    with pytest.raises(ValueError):
        PreprocessSpec(**{"height": 28, "width": 28, "channels": 1, **bad})


def test_domain_modules_do_not_import_tensorflow_or_io_libraries():
    code = (
        "import sys, domain.preprocessing, domain.model_port\n"
        "banned = {'tensorflow', 'keras', 'asyncpg', 'litestar'} & set(sys.modules)\n"
        "assert not banned, banned\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_sniff_format_names_the_format_from_leading_bytes(fmt):
    data = encode(Image.new("RGB", (4, 4)), fmt)
    assert sniff_format(data) == fmt
    assert sniff_format(data, ("PNG",)) == (fmt if fmt == "PNG" else None)


def test_sniff_format_knows_nothing_else():
    assert sniff_format(b"") is None
    assert sniff_format(b"P5\n1 1\n255\n\0") is None
    assert sniff_format(b"RIFF\0\0\0\0WAVEfmt ") is None
