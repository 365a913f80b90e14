"""Decode and resize: modes, odd image kinds, and hostile bytes become reasons."""

import io

import numpy as np
import pytest
from PIL import Image

from core.reasons import Reason, SampleError
from ingest.resizer import ResizeConfig, phash, resize_image


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb(w: int, h: int, colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("border", (64, 64)),
        ("keep_ratio", (128, 64)),  # short side to 64
        ("keep_ratio_largest", (64, 32)),  # long side to 64
        ("center_crop", (64, 64)),
        ("no", (400, 200)),
    ],
)
def test_resize_modes(mode, expected):
    out = resize_image(encode(rgb(400, 200)), ResizeConfig(image_size=64, resize_mode=mode))
    assert (out.width, out.height) == expected
    assert Image.open(io.BytesIO(out.data)).size == expected
    assert (out.original_width, out.original_height) == (400, 200)


def test_resize_only_if_bigger_keeps_small_images():
    out = resize_image(encode(rgb(40, 30)), ResizeConfig(image_size=64, resize_mode="keep_ratio",
                                                         resize_only_if_bigger=True))
    assert (out.width, out.height) == (40, 30)


def test_reduced_scale_decode_keeps_quality():
    """A large JPEG decoded at reduced scale still gives the right colours."""
    out = resize_image(encode(rgb(1600, 1200, (10, 200, 30)), quality=95), ResizeConfig(image_size=64))
    pixels = np.asarray(Image.open(io.BytesIO(out.data)))
    assert np.abs(pixels[32, 32].astype(int) - [10, 200, 30]).max() < 12


def test_exif_orientation_is_applied():
    image = rgb(300, 100)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° when displayed
    out = resize_image(encode(image, exif=exif), ResizeConfig(image_size=60, resize_mode="keep_ratio_largest"))
    assert (out.width, out.height) == (20, 60)
    assert (out.original_width, out.original_height) == (100, 300)


@pytest.mark.parametrize(
    "image, fmt",
    [
        (Image.new("CMYK", (120, 80), (0, 255, 255, 0)), "JPEG"),
        (Image.new("P", (120, 80), 3), "PNG"),
        (Image.new("RGBA", (120, 80), (255, 0, 0, 128)), "PNG"),
        (Image.new("LA", (120, 80), (100, 50)), "PNG"),
        (Image.new("L", (120, 80), 90), "JPEG"),
        (Image.fromarray(np.full((80, 120), 40000, dtype=np.uint16)), "PNG"),  # 16-bit
        (rgb(120, 80), "WEBP"),
        (rgb(120, 80), "GIF"),
    ],
)
def test_image_kinds_become_rgb(image, fmt):
    out = resize_image(encode(image, fmt), ResizeConfig(image_size=32))
    assert Image.open(io.BytesIO(out.data)).mode == "RGB"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", Reason.DECODE_ERROR),
        (b"<html>not an image</html>", Reason.DECODE_ERROR),
        (encode(rgb(300, 300))[:200], Reason.DECODE_ERROR),  # truncated JPEG
    ],
)
def test_hostile_bytes_become_reasons(data, reason):
    with pytest.raises(SampleError) as error:
        resize_image(data, ResizeConfig(image_size=32))
    assert error.value.reason is reason


def test_pixel_cap_is_checked_from_the_header():
    big = encode(rgb(2000, 2000), "PNG")
    with pytest.raises(SampleError) as error:
        resize_image(big, ResizeConfig(image_size=32, max_pixels=1_000_000))
    assert error.value.reason is Reason.TOO_MANY_PIXELS


@pytest.mark.parametrize(
    "size, cfg, reason",
    [
        ((30, 30), ResizeConfig(min_image_size=64), Reason.TOO_SMALL),
        ((1000, 100), ResizeConfig(max_aspect_ratio=3.0), Reason.ASPECT_RATIO),
        ((1000, 1000), ResizeConfig(max_image_area=10_000), Reason.TOO_MANY_PIXELS),
    ],
)
def test_geometry_limits(size, cfg, reason):
    with pytest.raises(SampleError) as error:
        resize_image(encode(rgb(*size)), cfg)
    assert error.value.reason is reason


def test_bad_config_values_name_themselves():
    with pytest.raises(ValueError, match="resize_mode='stretch'"):
        ResizeConfig(resize_mode="stretch")
    with pytest.raises(ValueError, match="encode_quality=0"):
        ResizeConfig(encode_quality=0)


def test_phash_is_stable_under_reencoding_and_differs_across_images():
    scene = Image.new("RGB", (200, 200), (240, 240, 240))
    scene.paste((200, 0, 0), (20, 20, 120, 120))
    other = Image.new("RGB", (200, 200), (240, 240, 240))
    other.paste((0, 0, 200), (90, 60, 190, 190))
    a = int(phash(scene), 16)
    b = int(phash(Image.open(io.BytesIO(encode(scene, quality=60)))), 16)
    c = int(phash(other), 16)
    assert bin(a ^ b).count("1") <= 4
    assert bin(a ^ c).count("1") > 10


def test_decode_margin_trades_decode_size_for_fidelity():
    """Margin 0 decodes at full size; margin 1 lets libjpeg shrink first; both give the output size."""
    big = Image.new("RGB", (1600, 1200), (10, 200, 30))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    fast = resize_image(data, ResizeConfig(image_size=200, resize_mode="keep_ratio_largest", decode_margin=1.0))
    full = resize_image(data, ResizeConfig(image_size=200, resize_mode="keep_ratio_largest", decode_margin=0))
    assert (fast.width, fast.height) == (full.width, full.height) == (200, 150)
    assert (fast.original_width, fast.original_height) == (1600, 1200)
    with pytest.raises(ValueError, match="decode_margin=0.5"):
        ResizeConfig(decode_margin=0.5)


def test_center_crop_resamples_the_kept_square_and_hashes_the_whole_picture():
    """The same pixels as resizing the whole image then cropping; the hash is of the whole picture."""
    y, x = np.mgrid[0:400, 0:600]
    picture = np.stack([128 + 100 * np.sin(x / 7), 128 + 100 * np.cos(y / 5), (x + y) * 0.25], axis=-1)
    image = Image.fromarray(picture.astype(np.uint8), "RGB")
    out = resize_image(encode(image, "PNG"), ResizeConfig(image_size=64, resize_mode="center_crop"))
    assert (out.width, out.height) == (64, 64)
    expected = image.resize((96, 64), Image.Resampling.HAMMING).crop((16, 0, 80, 64))
    got = np.asarray(Image.open(io.BytesIO(out.data)), dtype=np.float64)
    same_way = np.asarray(Image.open(io.BytesIO(encode(expected, quality=95))), dtype=np.float64)
    assert np.abs(got - same_way).max() <= 2
    assert out.phash == phash(image) != phash(expected)
