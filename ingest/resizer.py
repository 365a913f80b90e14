"""Bytes from the web in, one safe re-encoded image out — or a ``SampleError``.

The order of work is what keeps this fast and safe on hostile input:

1. read only the header and refuse images announcing more pixels than the cap
   (a decompression bomb is refused before it costs memory);
2. ask the JPEG decoder for a reduced-scale decode (libjpeg DCT scaling via
   Pillow's ``draft``): most web images are far larger than the target size, and
   decoding at 1/2, 1/4 or 1/8 scale skips most of the work;
3. apply the EXIF orientation, flatten alpha / palette / CMYK / 16-bit to RGB;
4. resize with the img2dataset modes, re-encode (which also drops metadata).

The perceptual hash of the picture is computed here too: the image is already
decoded and small, so it costs almost nothing, and filter/ needs it for
near-duplicate dedupe. With ``center_crop`` it is taken before the crop (it
identifies the picture, and filter's decontamination hashes whole images), and only
the kept square is resampled (Pillow's ``box``): the same pixels as resizing the
whole image and cropping, without resampling what the crop throws away.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.reasons import Reason, SampleError

# We check pixel counts ourselves (before decoding), with a reason code.
Image.MAX_IMAGE_PIXELS = None

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}


@dataclass(frozen=True)
class ResizeConfig:
    image_size: int = 256
    resize_mode: str = "border"
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0  # on the original's short side; 0 = no minimum
    max_image_area: float = float("inf")  # original width * height; refused above
    max_aspect_ratio: float = float("inf")  # original long side / short side
    max_pixels: int = 178_956_970  # decompression-bomb cap, checked from the header
    # JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) giving at least this
    # many times the output size; 0 turns reduced-scale decoding off.
    decode_margin: float = 1.5

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={self.resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"encode_format={self.encode_format!r}: choose one of {', '.join(ENCODE_FORMATS)}")
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size}: must be at least 8 pixels")
        if not (self.decode_margin == 0 or self.decode_margin >= 1):
            raise ValueError(f"decode_margin={self.decode_margin}: must be 0 (full decode) or at least 1")
        if not 1 <= self.encode_quality <= 100:
            raise ValueError(f"encode_quality={self.encode_quality}: must be within 1..100")


@dataclass(frozen=True)
class ResizedImage:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    phash: str  # 64-bit DCT perceptual hash of the content (before border/crop), 16 hex digits
    luma_std: float = 0.0  # grey-level standard deviation of the content (near-blank check)


def _target_size(width: int, height: int, cfg: ResizeConfig) -> tuple[int, int]:
    """Size to resize to before any crop or border; (width, height) when unchanged."""
    mode, size = cfg.resize_mode, cfg.image_size
    if mode == "no":
        return width, height
    if mode in ("keep_ratio", "center_crop"):
        scale = size / min(width, height)
    else:  # border, keep_ratio_largest
        scale = size / max(width, height)
    if cfg.resize_only_if_bigger and scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


def perceptual_signature(image: Image.Image) -> tuple[str, float]:
    """(64-bit pHash, grey-level standard deviation) from one 32x32 grey thumbnail.

    The hash is the sign of the 8x8 lowest DCT frequencies against their median (the
    filter's near-duplicate dedupe compares it by Hamming distance); the deviation
    is what the filter's near-blank check reads (0 for a flat image).
    """
    # reducing_gap: a large picture is first box-reduced by an integer factor, so the
    # cost stays small whatever size the caller hands in (the decoded picture, for center_crop)
    thumbnail = image.convert("L").resize((32, 32), Image.Resampling.BILINEAR, reducing_gap=2.0)
    gray = np.asarray(thumbnail, dtype=np.float64)
    low = _DCT8 @ gray @ _DCT8.T  # 8x8 lowest frequencies of the 32x32 DCT-II
    bits = low.flatten() > np.median(low.flatten()[1:])
    return np.packbits(bits).tobytes().hex(), float(gray.std())


def phash(image: Image.Image) -> str:
    """64-bit perceptual hash (see ``perceptual_signature``)."""
    return perceptual_signature(image)[0]


def _dct_matrix(n: int, keep: int) -> np.ndarray:
    k = np.arange(keep)[:, None]
    x = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * x + 1) * k / (2 * n))


_DCT8 = _dct_matrix(32, 8)


def resize_image(data: bytes, cfg: ResizeConfig) -> ResizedImage:
    """Decode, check, resize and re-encode ``data``; raise ``SampleError`` on any failure."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size  # header only, nothing decoded yet
    except UnidentifiedImageError:
        raise SampleError(Reason.DECODE_ERROR, "not a recognised image format") from None
    except Image.DecompressionBombError as exc:  # if another library restored Pillow's own cap
        raise SampleError(Reason.TOO_MANY_PIXELS, str(exc)[:200]) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise SampleError(Reason.DECODE_ERROR, str(exc)[:200]) from None
    if width < 1 or height < 1 or width * height > cfg.max_pixels:
        raise SampleError(Reason.TOO_MANY_PIXELS, f"{width}x{height}")
    if width * height > cfg.max_image_area:
        raise SampleError(Reason.TOO_MANY_PIXELS, f"{width}x{height} > max_image_area")
    if min(width, height) < cfg.min_image_size:
        raise SampleError(Reason.TOO_SMALL, f"{width}x{height}")
    if max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        raise SampleError(Reason.ASPECT_RATIO, f"{width}x{height}")

    try:
        orientation = image.getexif().get(0x0112, 1)
        rotated = orientation in (5, 6, 7, 8)
        out_w, out_h = _target_size(height, width, cfg) if rotated else _target_size(width, height, cfg)
        if image.format == "JPEG" and cfg.decode_margin:
            # Reduced-scale DCT decode, never below the request. libjpeg's scaled IDCT
            # blurs and aliases fine detail, so an image that lands just above 1x the
            # output loses up to 10 dB on real photographs; margin 1.5 keeps it at least
            # 1.5x for +0.4 ms per web photo (the entropy decoding, most of the cost, is
            # the same at every scale). Figures: BENCHMARKS.md, ingest on photographs.
            w, h = (out_h, out_w) if rotated else (out_w, out_h)
            margin = cfg.decode_margin
            image.draft("RGB", (math.ceil(w * margin), math.ceil(h * margin)))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # no copy of the picture when it is upright (most are)
        image = _to_rgb(image)
        if cfg.resize_mode == "center_crop":  # the hash sees the whole picture, the resize only what is kept
            content_hash, luma_std = perceptual_signature(image)
            image = _resize_center_crop(image, (out_w, out_h), cfg.image_size)
        else:
            if image.size != (out_w, out_h):
                image = image.resize((out_w, out_h), _filter(image.size, (out_w, out_h)))
            content_hash, luma_std = perceptual_signature(image)  # of the picture, before any border
            image = _add_border(image, cfg)
        buffer = io.BytesIO()
        save_args = {"quality": cfg.encode_quality} if cfg.encode_format != "png" else {}
        image.save(buffer, format=ENCODE_FORMATS[cfg.encode_format], **save_args)
    except SampleError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError) as exc:
        raise SampleError(Reason.DECODE_ERROR, str(exc)[:200]) from None
    return ResizedImage(
        data=buffer.getvalue(),
        width=image.width,
        height=image.height,
        original_width=width if not rotated else height,
        original_height=height if not rotated else width,
        phash=content_hash,
        luma_std=round(luma_std, 2),
    )


def _filter(size: tuple[int, int], target: tuple[int, int]) -> Image.Resampling:
    """Hamming to shrink, Lanczos to enlarge.

    After the DCT-scaled decode a JPEG is at most 2x the target (times the margin).
    Pillow's filters widen with the scale factor, so shrinking is antialiased; the
    Hamming-windowed sinc has the support, hence the cost, of bilinear but keeps more
    detail: on real photographs +0.9-1.2 dB mean against a full-resolution Lanczos
    reference; bicubic adds 1-2 dB more for 15-20% more CPU (BENCHMARKS.md, ingest on
    photographs).
    """
    shrinking = target[0] < size[0] and target[1] < size[1]
    return Image.Resampling.HAMMING if shrinking else Image.Resampling.LANCZOS


def _resize_center_crop(image: Image.Image, target: tuple[int, int], size: int) -> Image.Image:
    """The centre ``size`` square of ``image`` resized to ``target``; only that window is resampled.

    Resizing the kept window alone (Pillow's ``box``) gives the pixels of a resize of
    the whole image followed by the crop, without resampling what the crop throws away.
    """
    out_w, out_h = target
    if min(target) < size:  # smaller than the square (resize_only_if_bigger): resized, not cropped
        return image if image.size == target else image.resize(target, _filter(image.size, target))
    left, top = (out_w - size) // 2, (out_h - size) // 2
    if image.size == target:
        return image.crop((left, top, left + size, top + size))
    sx, sy = image.width / out_w, image.height / out_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return image.resize((size, size), _filter(image.size, target), box=box)


def _add_border(image: Image.Image, cfg: ResizeConfig) -> Image.Image:
    """With resize_mode border: the image centred on a white square."""
    size = cfg.image_size
    if cfg.resize_mode == "border" and max(image.size) <= size and image.size != (size, size):
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
        return canvas
    return image
