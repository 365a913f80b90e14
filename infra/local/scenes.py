"""The synthetic world of the demo corpus: compositional scenes and their captions.

One coloured shape on a background, at a size and position. The class of a scene is
its (colour, shape) pair; some pairs are *held out* — they never appear in any
training data, so zero-shot transfer to unseen compositions can be measured
(each held-out colour and shape still appears in training, in other pairs).

Everything is a pure function of a ``random.Random``: the same seed gives the same
scene, pixels and caption. The corpus generator (web pages, URL list, ground truth)
and the evaluation set both draw from here, so they cannot drift apart.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 30),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "purple": (130, 50, 170),
    "pink": (247, 130, 190),
    "brown": (120, 72, 30),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")

# A 2 x 3 block: red and blue stars, hexagons and crosses never appear in any training
# data, while red and blue keep three training shapes each and every held-out shape keeps
# six training colours. Among themselves the held-out classes differ in colour *and*
# shape, so ``unseen_only`` measures composition, not colour alone (an earlier design of
# six pairs in six different colours was solved by colour at ~1.0 by every model).
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (colour, shape) for colour in ("red", "blue") for shape in ("star", "hexagon", "cross")
)
# Fixed class order: colour-major. Index i of CLASSES is class i everywhere.
CLASSES: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
SEEN_CLASSES = tuple(p for p in CLASSES if p not in HELD_OUT_PAIRS)
UNSEEN_CLASSES = tuple(p for p in CLASSES if p in HELD_OUT_PAIRS)

# Neutral backgrounds so no shape colour disappears into its background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "light grey": (200, 200, 200),
    "dark grey": (60, 60, 60),
    "black": (15, 15, 15),
    "beige": (225, 210, 180),
}

SIZES: dict[str, float] = {"small": 0.4, "medium": 0.55, "large": 0.7}  # of the short side
POSITIONS: tuple[str, ...] = ("left", "center", "right")

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} on a {background} background",
    "photo: {size} {colour} {shape}, {position} side",
    "a {size} {colour} {shape}",
    "{colour} {shape} clipart",
    "an image of a {colour} {shape} against {background}",
    "the {colour} {shape} sits on the {position}",
    "stock illustration of a {size} {colour} {shape} on {background}",
    "{Colour} {shape} icon, {background} backdrop",
    "a simple drawing of a {colour} {shape}",
    "close-up of a {colour} {shape} ({size})",
    "{shape} in {colour}",
    "my favourite {colour} {shape}!",
)

# Zero-shot prompts: built from the label names only.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {colour} {shape}",
    "a {colour} {shape}",
    "an image of a {colour} {shape}",
)


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image deterministically."""

    colour: str
    shape: str
    size: str
    position: str
    background: str
    width: int
    height: int
    texture: str  # "flat" | "gradient" | "noise"
    seed: int

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)


def web_dimensions(rng: random.Random) -> tuple[int, int]:
    """A realistic web image size: 300–1600 px on the long side, mostly landscape."""
    long_side = int(rng.triangular(300, 1600, 700))
    ratio = rng.choice((1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3))
    if ratio >= 1:
        return long_side, max(1, int(long_side / ratio))
    return max(1, int(long_side * ratio)), long_side


def sample_scene(
    rng: random.Random,
    pair: tuple[str, str] | None = None,
    *,
    allow_held_out: bool = False,
    dimensions: tuple[int, int] | None = None,
) -> Scene:
    """Draw a scene; by default never one of the held-out pairs."""
    if pair is None:
        pool = CLASSES if allow_held_out else SEEN_CLASSES
        pair = pool[rng.randrange(len(pool))]
    elif pair in HELD_OUT_PAIRS and not allow_held_out:
        raise ValueError(f"{pair} is a held-out pair; pass allow_held_out=True")
    width, height = dimensions or web_dimensions(rng)
    return Scene(
        colour=pair[0],
        shape=pair[1],
        size=rng.choice(tuple(SIZES)),
        position=rng.choice(POSITIONS),
        background=rng.choice(tuple(BACKGROUNDS)),
        width=width,
        height=height,
        texture=rng.choice(("flat", "flat", "gradient", "noise")),
        seed=rng.getrandbits(32),
    )


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption that truly describes ``scene``, from one of the natural templates."""
    template = CAPTION_TEMPLATES[rng.randrange(len(CAPTION_TEMPLATES))]
    return template.format(
        colour=scene.colour,
        Colour=scene.colour.capitalize(),
        shape=scene.shape,
        size=scene.size,
        position=scene.position,
        background=scene.background,
    )


def prompts(colour: str, shape: str) -> list[str]:
    return [t.format(colour=colour, shape=shape) for t in PROMPT_TEMPLATES]


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)  # type: ignore[return-value]


# Every scene's backdrop carries its own smooth light field (a few random low-frequency
# waves, up to this many grey levels): real photos differ in lighting and layout even
# when they show the same thing, so two distinct scenes of one class and position are
# not perceptual duplicates of each other (without it, a 64-bit pHash collides for a
# quarter of distinct scenes and near-duplicate ground truth would be meaningless).
LIGHT_FIELD_AMPLITUDE = 70
LIGHT_FIELD_WAVES = 6


def _light_field(scene: Scene, base: tuple[int, int, int]) -> np.ndarray:
    """A smooth (H, W) offset in grey levels, a pure function of the scene's seed.

    Shifted to one side on bright and dark backgrounds, so it never clips (a white
    backdrop only darkens, a black one only lightens) and keeps its shape.
    """
    rng = np.random.default_rng([scene.seed, 0x11647])
    ys, xs = np.mgrid[0:24, 0:24] / 24.0
    field = np.zeros((24, 24))
    for _ in range(LIGHT_FIELD_WAVES):
        fx, fy = rng.uniform(-2.5, 2.5, 2)
        field += rng.uniform(0.5, 1.0) * np.cos(2 * np.pi * (fx * xs + fy * ys) + rng.uniform(0, 2 * np.pi))
    field *= LIGHT_FIELD_AMPLITUDE / (np.abs(field).max() + 1e-9)
    brightness = sum(base) / 3
    if brightness > 180:
        field -= LIGHT_FIELD_AMPLITUDE
    elif brightness < 80:
        field += LIGHT_FIELD_AMPLITUDE
    smooth = Image.fromarray(field.astype(np.float32), "F").resize((scene.width, scene.height), Image.Resampling.BILINEAR)
    return np.asarray(smooth)


def _background(scene: Scene, rng: random.Random) -> Image.Image:
    base = _jitter(BACKGROUNDS[scene.background], rng, 10)
    size = (scene.width, scene.height)
    image = _textured(scene, rng, base, size)
    lit = np.asarray(image, dtype=np.float32) + _light_field(scene, base)[..., None]
    return Image.fromarray(np.clip(lit, 0, 255).astype(np.uint8), "RGB")


def _textured(scene: Scene, rng: random.Random, base: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    if scene.texture == "gradient":
        other = _jitter(base, rng, 40)
        ramp = Image.linear_gradient("L").resize(size)
        return Image.composite(Image.new("RGB", size, base), Image.new("RGB", size, other), ramp)
    image = Image.new("RGB", size, base)
    if scene.texture == "noise":
        # From the scene's own seed (Pillow's effect_noise uses the C library's global
        # rand(), which would make pixels depend on the process, not the scene).
        grain = np.random.default_rng(scene.seed).standard_normal((scene.height, scene.width), dtype=np.float32)
        noise = Image.fromarray(np.clip(128 + 18 * grain, 0, 255).astype(np.uint8), "L").convert("RGB")
        image = Image.blend(image, noise, 0.12)
    return image


def _polygon(cx: float, cy: float, radius: float, points: int, rotation: float, inner: float = 1.0):
    vertices = []
    steps = points * (2 if inner != 1.0 else 1)
    for i in range(steps):
        r = radius if (i % 2 == 0 or inner == 1.0) else radius * inner
        angle = rotation + 2 * math.pi * i / steps - math.pi / 2
        vertices.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return vertices


def render(scene: Scene) -> Image.Image:
    """Draw ``scene`` as an RGB image of its web dimensions."""
    rng = random.Random(scene.seed)
    image = _background(scene, rng)
    draw = ImageDraw.Draw(image)
    w, h = scene.width, scene.height
    radius = SIZES[scene.size] * min(w, h) / 2 * rng.uniform(0.9, 1.1)
    margin = radius * 1.05
    thirds = {"left": w / 6, "center": w / 2, "right": 5 * w / 6}
    cx = min(max(thirds[scene.position] + rng.uniform(-0.04, 0.04) * w, margin), w - margin)
    cy = min(max(h / 2 + rng.uniform(-0.15, 0.15) * h, margin), h - margin)
    fill = _jitter(COLOURS[scene.colour], rng, 12)
    tilt = rng.uniform(-0.15, 0.15)
    r = radius
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.15, 4, math.pi / 4 + tilt), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.1, 3, tilt), fill=fill)
    elif scene.shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.1, 5, tilt, inner=0.45), fill=fill)
    elif scene.shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, tilt), fill=fill)
    elif scene.shape == "cross":
        arm = r * 0.36
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {scene.shape!r}")
    if rng.random() < 0.3:  # some photos are a little soft
        image = image.filter(ImageFilter.BoxBlur(radius=max(1, round(max(w, h) / 800))))
    return image
