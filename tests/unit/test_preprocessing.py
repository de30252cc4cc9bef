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

from domain import preprocessing
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


# --- the tensors do not change (issue 17, item 3) -------------------------------------------------
#
# Digests recorded with the implementation before the strip-wise rewrite (Pillow 13.0.0): every
# prediction already in a log was preprocessed that way, so `reproduce` must keep finding these.
# A difference after a Pillow upgrade means old predictions would no longer reproduce bit for bit.

RECORDED_FIXTURE_DIGITS = {1: "7899094e3bc1fce2f5ca17d9a540382083dda091cf3cda26f37df61c238e156d",
                           3: "ae82ffd667fefc6f9721d0c4316fa469f221189ff262fbed9a7c941b0b53e5ac"}
RECORDED_TENSORS = {
    "1": "2d6802a69ee77ef5248d4519669028ed8cef12332151da9bc3b7d1e4abbf8705",
    "L": "36b8d0392b950e50b2ed10b54108d35ba0112d5793e05011837941cfb301735d",
    "L-transparency": "1643cecff320b7e67df64b282593da79c3e4f5be4339363b73114f4c92e563d1",
    "LA": "d56baec5730d1acbaf2070e633fb1b82348ad32e12f32e780b7d668efd13b5a8",
    "P": "484929f2243705cbe1e8c47a8f3b47332ebcba15def726e85a27b9988602e3c5",
    "P-transparency": "e84268c2ec5fdc7f51fcd80f5c45f2ec2205fbbc810f951d26f990b6df28f9af",
    "RGB": "d4c5bccaebc2c242d4d7a252026e4beb679f75796173c33d182463090bb8e70d",
    "RGB-transparency": "11203b37d5ed783bb7b38c74a5b9f1240f2438886ec8d188b3d6d3051268f136",
    "RGBA-gray": "a8e4c9df54a7b4fea866cb661bab37d0a614f33879d60310005200b75c1bf12b",
    "RGBA-rgb-white": "c230a462fe07e55f97bf00e2c127720fcc88ad53c18591d7f3143d866d9c8761",
    "I;16": "64ee9c982cba1c5e47caa56058abca9b8974e076b94124b140b63652864a7c78",
    "I;16-tiff": "b84e256d00950ecc373f78d969b40d8d8b919509a564a830f2f038451d28b35d",
    "I-tiff": "e33d96500092d2c7a80afb7b856230dfdf3ec81edbb260dcf8ceaf72cab8436c",
    "F-tiff": "25ed0f0cb8a66bc8af1cca0d5f6bd7d1fd0798efa12111c5377bf8174d8ff72a",
    "CMYK-tiff": "700b744281ccf4b09294ccea40f468f2155ffee7df450a1043e34534290ee7a4",
    "YCbCr-tiff": "9ad6fcb27a9954b6ad37b7e90f850aa7840e7f763f3f7bdcad88ea0e1ada3b6c",
    "RGBA-webp": "bbd282ec0f001db78b55c60ea81e06c312a29d2b36ed0ac563f09a5980ed5015",
    "RGB-bmp": "b091a90b360b8116600d5a22796fb3af58d9b7514887b5bd573c4c02c630a405",
    "P-gif": "d91286248effd655bcfa9ff5c05507bc0e13e2eb5b8b47adfd0e8390b52c2ad0",
    "L-small": "9c1db1677a60f66a9d1c90cda5d78b1326d9fe7bb81028093ed8ab73474e466d",
    "RGBA-orientation-1": "a8e4c9df54a7b4fea866cb661bab37d0a614f33879d60310005200b75c1bf12b",
    "L-orientation-1": "f5622f8b6d0460af88ef1b319d994b6bf64fe43a9ad6ebe1321af893ec80b47f",
    "RGBA-orientation-2": "fcc99d548cc06deafd7eac441c90f2ebacc82c89c6513c54edd37f1600f298bc",
    "L-orientation-2": "77b3d118369a2f232ebd72a6d4c45e88e42e5a543252254fe49f013aba828659",
    "RGBA-orientation-3": "8877969147f8175372a326b96f17ff66fab5f9e9d2df58ac874064f798ce3b60",
    "L-orientation-3": "94f951b56641f9acd5f935f49fd37905523d18ea080ad5e526ce82aab81aa15a",
    "RGBA-orientation-4": "58b2304630992ad9b592e772a37d50819f8636220dc115e8430725265e2f107f",
    "L-orientation-4": "2288f70d16a1cbe6a149928d8f15532d8c9660ae9615a9fd9f9f4530795cfa84",
    "RGBA-orientation-5": "253f68ad86bac8054aab15c2bb9d3a3f3d3d39e5d2075bf95c82ded9c3015dca",
    "L-orientation-5": "abfb13e9008f5f5fff14d15c71dff31af3c8074f6b2431e8ae235153fe7290de",
    "RGBA-orientation-6": "a58916b01fef667a2abeca9cf75696a2e804cb54fa20848fb742e9989ce6eb96",
    "L-orientation-6": "121b2d5cde9f3303873e6d0a9298c6f19cbbe45ee56168cc5ba0389c33f57305",
    "RGBA-orientation-7": "b72bc474283d53c41635b559cd5ae11b338c1ac799110793cf39f7cde53eb74e",
    "L-orientation-7": "9183c3c3af167d4aa459a018af7d7e47d54f445ef23f7d7c3c6c1d7b67d1d4ec",
    "RGBA-orientation-8": "b84607265ac595b8198a239eecb27b86dcb5e8a745de33428f99497c52066fb2",
    "L-orientation-8": "7d4cb06c6b964273630ae29c7d76d8754f351214956540912e14c5786a2c6bc4",
}


def recorded_corpus() -> dict[str, tuple[bytes, dict]]:
    """name -> (bytes, spec fields): one image per mode, alpha case, orientation and format."""
    rng = np.random.default_rng(17)
    size = (61, 47)

    def noise(channels, high=256, dtype=np.uint8):
        shape = (size[1], size[0]) if channels == 1 else (size[1], size[0], channels)
        return rng.integers(0, high, shape).astype(dtype)

    gray, color, alpha = noise(1), noise(3), noise(1)
    rgba = Image.fromarray(np.dstack([color, alpha]), "RGBA")
    palette = Image.fromarray(noise(1, 64), "L").convert("P")
    palette.putpalette(rng.integers(0, 256, 64 * 3).astype(np.uint8).tobytes())
    sixteen = Image.new("I;16", size)
    sixteen.frombytes(noise(1, 65536, np.uint16).astype("<u2").tobytes())
    images = {
        "1": (encode(Image.fromarray(gray).convert("1")), {}),
        "L": (encode(Image.fromarray(gray)), {}),
        "L-transparency": (encode(Image.fromarray(gray), transparency=int(gray[0, 0])), {}),
        "LA": (encode(Image.fromarray(np.dstack([gray, alpha]), "LA")), {"background": 100}),
        "P": (encode(palette), {}),
        "P-transparency": (encode(palette, transparency=3), {"channels": 3}),
        "RGB": (encode(Image.fromarray(color)), {"channels": 3}),
        "RGB-transparency": (encode(Image.fromarray(color), transparency=tuple(int(v) for v in color[0, 0])), {}),
        "RGBA-gray": (encode(rgba), {}),
        "RGBA-rgb-white": (encode(rgba), {"channels": 3, "background": 255}),
        "I;16": (encode(sixteen), {}),
        "I;16-tiff": (encode(sixteen, "TIFF"), {"resample": "lanczos"}),
        "I-tiff": (encode(Image.fromarray(noise(1, 80000, np.int32) - 5000, "I"), "TIFF"), {}),
        "F-tiff": (encode(Image.fromarray(rng.normal(128, 90, (size[1], size[0])).astype(np.float32), "F"), "TIFF"), {}),
        "CMYK-tiff": (encode(Image.fromarray(noise(4), "CMYK"), "TIFF"), {"channels": 3}),
        "YCbCr-tiff": (encode(Image.fromarray(color).convert("YCbCr"), "TIFF"), {}),
        "RGBA-webp": (encode(rgba, "WEBP", lossless=True, exact=True), {"channels": 3}),
        "RGB-bmp": (encode(Image.fromarray(color), "BMP"), {"resample": "nearest"}),
        "P-gif": (encode(palette, "GIF"), {"resample": "bicubic"}),
        "L-small": (encode(Image.fromarray(gray[:9, :13])), {}),
    }
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        images[f"RGBA-orientation-{orientation}"] = (encode(rgba, exif=exif), {})
        images[f"L-orientation-{orientation}"] = (encode(Image.fromarray(gray), exif=exif), {"channels": 3})
    return images


@pytest.mark.parametrize("channels", [1, 3])
def test_fixture_digit_tensors_are_the_recorded_ones(channels):
    combined = hashlib.sha256()
    for path in sorted(DIGITS.glob("*.png")):
        combined.update(bytes.fromhex(preprocess(path.read_bytes(), PreprocessSpec(28, 28, channels)).tensor_sha256))
    assert combined.hexdigest() == RECORDED_FIXTURE_DIGITS[channels]


@pytest.mark.parametrize("strip_pixels", [None, 1, 300], ids=["default-strips", "row-by-row", "5-rows"])
def test_every_mode_and_orientation_gives_the_recorded_tensor(strip_pixels, monkeypatch):
    if strip_pixels is not None:  # several strips, a short last one, and one row at a time
        monkeypatch.setattr(preprocessing, "STRIP_PIXELS", strip_pixels)
    corpus = recorded_corpus()
    assert corpus.keys() == RECORDED_TENSORS.keys()
    different = [
        name for name, (data, fields) in corpus.items()
        if preprocess(data, PreprocessSpec(**{"height": 28, "width": 28, "channels": 1, **fields})).tensor_sha256
        != RECORDED_TENSORS[name]
    ]
    assert different == []


def test_alpha_compositing_is_the_documented_integer_formula_for_every_value():
    colour = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    alpha = colour.T.copy()
    rgba = Image.fromarray(np.dstack([colour, 255 - colour, colour // 3, alpha]), "RGBA")
    la = Image.fromarray(np.dstack([colour, alpha]), "LA")
    wide = np.asarray(rgba, dtype=np.int64)
    for background in range(256):
        expected = (wide[..., :3] * wide[..., 3:] + background * (255 - wide[..., 3:]) + 127) // 255
        assert np.array_equal(np.asarray(preprocessing._composite(rgba, background)), expected)
        assert np.array_equal(np.asarray(preprocessing._composite(la, background)), expected[..., 0])


# --- the worst case costs a bounded amount of memory and time -------------------------------------

WORST_CASE_RSS_MIB = 300  # README, "Memory"
WORST_CASE_SECONDS = 1.5  # about 0.3-0.5 s here: a guard, not a benchmark

# Linux carries ru_maxrss over fork and exec: a child of this (large) pytest process starts with
# pytest's peak as its own and would measure nothing. A small interpreter in between starts it.
_FRESH = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
_MEASURE = """
import resource, sys, time
from domain.preprocessing import PreprocessSpec, preprocess
data = open(sys.argv[1], "rb").read()
spec = PreprocessSpec(28, 28, int(sys.argv[2]))
preprocess(open(sys.argv[3], "rb").read(), spec)  # load the format's plugin first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
preprocess(data, spec)
elapsed = time.perf_counter() - started
print(elapsed, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.parametrize(
    ("fmt", "mode", "fill", "channels", "options"),
    [
        pytest.param("WEBP", "RGBA", (255, 255, 255, 128), 3, {"lossless": True}, id="webp-rgba"),
        pytest.param("PNG", "RGBA", (255, 255, 255, 128), 1, {"compress_level": 9}, id="png-rgba"),
        pytest.param("TIFF", "F", 77.0, 3, {"compression": "tiff_adobe_deflate"}, id="tiff-float"),
    ],
)
def test_the_largest_accepted_image_stays_within_the_memory_and_time_bounds(
    fmt, mode, fill, channels, options, tmp_path
):
    """The audit's upload: a few hundred KB that declare the most pixels the spec accepts, in the
    modes that cost the most (RGBA WebP: libwebp's canvases; RGBA PNG; 32-bit float TIFF)."""
    side = int(PreprocessSpec(28, 28, 1).max_pixels ** 0.5)
    assert side * side <= PreprocessSpec(28, 28, 1).max_pixels
    big, small = tmp_path / "big", tmp_path / "small"
    big.write_bytes(encode(Image.new(mode, (side, side), fill), fmt, **options))
    small.write_bytes(encode(Image.new(mode, (8, 8), fill), fmt, **options))
    assert big.stat().st_size < 512 * 1024
    done = subprocess.run(
        [sys.executable, "-c", _FRESH, sys.executable, "-c", _MEASURE, str(big), str(channels), str(small)],
        cwd=REPO, check=True, timeout=60, capture_output=True, text=True,
    )
    elapsed, peak_mib = map(float, done.stdout.split())
    assert peak_mib < WORST_CASE_RSS_MIB, f"{peak_mib:.0f} MiB for a {side}x{side} {mode} {fmt}"
    assert elapsed < WORST_CASE_SECONDS, f"{elapsed:.2f} s for a {side}x{side} {mode} {fmt}"


def test_a_webp_declaring_too_many_pixels_is_refused_before_pillow_opens_it(monkeypatch):
    """libwebp allocates the whole canvas when the file is opened, before the size check on the
    opened image could run: the declared size is read from the header first."""
    frames = [Image.new("RGBA", (16, 16), (255, 0, 0, 255)), Image.new("RGBA", (16, 16), (0, 0, 255, 255))]
    data = bytearray(encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True))
    assert data[12:16] == b"VP8X"
    data[24:27] = data[27:30] = (12_000 - 1).to_bytes(3, "little")  # a 12000 x 12000 canvas

    def no_opening(*args, **kwargs):
        raise AssertionError("Pillow opened the WebP")

    monkeypatch.setattr(Image, "open", no_opening)
    with pytest.raises(Rejected) as caught:
        preprocess(bytes(data), GRAY)
    assert caught.value.code == "image_too_large"
    assert "12000x12000" in caught.value.message


@pytest.mark.parametrize("fmt", ["VP8", "VP8L", "VP8X"])
def test_the_webp_header_size_is_the_one_pillow_reports(fmt):
    image = Image.new("RGB", (37, 23), (1, 2, 3))
    if fmt == "VP8X":
        data = encode(image, "WEBP", exif=Image.Exif())
    else:
        data = encode(image, "WEBP", lossless=fmt == "VP8L")
    assert data[12:16].rstrip() == fmt.encode()
    assert preprocessing._webp_canvas_size(data) == Image.open(io.BytesIO(data)).size == (37, 23)
