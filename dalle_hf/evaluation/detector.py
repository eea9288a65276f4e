"""A rule-based object detector for ShapesWorld images, tolerant of the blur and colour drift of model outputs.

Steps, for a (H, W, 3) uint8 image (resized to 64x64 first when it is another size):
1. Opacity. A palette colour c blended with white at opacity a is 255 - a * (255 - c). Each pixel gets the opacity
   of the palette colour that explains it best; pixels with opacity >= 0.25 form loose regions (4-connected).
2. Colour of a region: the palette colour nearest to the median RGB of its more saturated half.
3. Objects: the region's pixels whose opacity in that colour is >= 0.5 (a soft edge is cut half-way, where the
   crisp edge was), split into 4-connected parts; parts below `min_area` pixels (specks) are ignored. Found
   parts are removed and the rest of the region is cut again in its own colour, so touching objects of
   different colours come apart.
4. Shape from blur-robust features of the part's mask in its bounding box (`shape_features`): fill ratio
   (square ~1), height of the centroid (a triangle, widest at the bottom, ~0.67; symmetric shapes 0.5) and taper,
   how fast rows narrow away from the middle (diamond ~2 px per px from its 45 degree edges, circle ~0.5).
5. Size from the bounding-box extent (small 14 px, large 24 px; threshold 19), cell from the bounding-box centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.shapesworld import COLORS, IMAGE_SIZE, SIZES

PALETTE_NAMES: tuple[str, ...] = tuple(COLORS)
_DEFICIT = 255.0 - np.array([COLORS[c] for c in PALETTE_NAMES], dtype=np.float32)  # (K, 3) colour minus white
_DEFICIT_NORM2 = (_DEFICIT ** 2).sum(axis=1)
_PALETTE = np.array([COLORS[c] for c in PALETTE_NAMES], dtype=np.float32)

LOOSE_OPACITY = 0.25  # first cut: anything this far from white may belong to an object
MAX_COLORS_PER_REGION = 4
FOREGROUND_OPACITY = 0.5  # final cut, in the object's own colour: half-way through a soft edge
MIN_AREA = 20
SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2  # bbox extent above this is "large"
SQUARE_FILL = 0.89  # fill ratio above this: square
TRIANGLE_CENTROID = 0.585  # normalised centroid height above this: triangle (apex up) ...
TRIANGLE_SKEW = 0.5  # ... and so is a shape whose lower quarter is this much wider than its upper quarter
DIAMOND_TAPER = 0.8  # taper above this (and not a square or triangle): diamond, below it: circle


@dataclass(frozen=True)
class DetectedObject:
    """An object found in an image: attributes as in ShapesWorld, bbox centre (cx, cy) and area in pixels."""

    shape: str
    color: str
    size: str
    cell: int
    cx: float
    cy: float
    area: int


def _as_uint8_64(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image has shape {image.shape}; expected (H, W, 3) RGB")
    if image.dtype != np.uint8:
        raise ValueError(f"image has dtype {image.dtype}; expected uint8 (0..255)")
    if image.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        from PIL import Image

        image = np.asarray(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
    return image


def _deficit(image: np.ndarray) -> np.ndarray:
    return 255.0 - image.astype(np.float32)


def opacity_map(image: np.ndarray) -> np.ndarray:
    """Per-pixel opacity of the best-fitting palette colour over white, (H, W) float32.

    The best fit leaves the smallest residual |d - a v|^2 = |d|^2 - (d.v)^2 / |v|^2 (d: the pixel's deficit from
    white, v: the colour's, a = d.v / |v|^2 >= 0), i.e. the largest (d.v)^2 / |v|^2.
    """
    proj = np.maximum(_deficit(image) @ _DEFICIT.T, 0.0)  # (H, W, K): d.v
    best = (proj * proj / _DEFICIT_NORM2).argmax(-1)
    return np.take_along_axis(proj, best[..., None], axis=-1)[..., 0] / _DEFICIT_NORM2[best]


def color_opacity(deficit: np.ndarray, color: int) -> np.ndarray:
    """Opacity of palette colour `color` over white that best explains each pixel (projection), (...,)."""
    return deficit @ _DEFICIT[color] / _DEFICIT_NORM2[color]


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labels of a boolean mask: (labels 0 = background, 1..n), n."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:  # each pixel takes the smallest label among itself and its 4 neighbours ...
        new = labels.copy()
        np.minimum(new[1:], labels[:-1], out=new[1:])
        np.minimum(new[:-1], labels[1:], out=new[:-1])
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        new[~mask] = big
        new = np.append(new.ravel(), big)[new]  # ... then jumps to the label of the pixel its label points at
        if np.array_equal(new, labels):
            break
        labels = new
    roots, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(h, w) + 1
    dense[~mask] = 0
    return dense, int(len(roots) - (1 if big in roots else 0))


def _width_at(widths: np.ndarray, t: float) -> float:
    """Row width at fractional height t (0 = top edge, 1 = bottom edge), linearly interpolated."""
    pos = min(max(t * len(widths) - 0.5, 0.0), len(widths) - 1.0)
    lo = int(pos)
    hi = min(lo + 1, len(widths) - 1)
    return float(widths[lo] + (widths[hi] - widths[lo]) * (pos - lo))


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """Blur-robust features of a boolean mask cropped to its bounding box.

    fill: area / bbox area (square ~1, circle ~0.79, triangle and diamond ~0.5-0.57).
    centroid: mean pixel height, 0 = top, 1 = bottom (triangle ~0.67, symmetric shapes 0.5).
    skew: (width at 3/4 height - width at 1/4 height) / (h / 2) (triangle ~1, symmetric shapes 0).
    taper: how fast rows narrow away from the middle row, in px of width per px of height, between the middle
        and the quarter heights (diamond ~1.7-2 from its 45 degree edges, circle ~0.5, square 0). Unlike the fill
        ratio it barely changes when blur cuts off a diamond's tips.
    """
    h, w = mask.shape
    widths = mask.sum(axis=1).astype(np.float64)
    ys = np.nonzero(mask)[0]
    quarter = (_width_at(widths, 0.25) + _width_at(widths, 0.75)) / 2
    return {
        "fill": float(widths.sum() / (h * w)),
        "centroid": float((ys.mean() + 0.5) / h),
        "taper": (_width_at(widths, 0.5) - quarter) / (h / 4),
        "skew": (_width_at(widths, 0.75) - _width_at(widths, 0.25)) / (h / 2),
    }


def classify_shape(mask: np.ndarray) -> str:
    """Shape name of a boolean mask cropped to its bounding box."""
    f = shape_features(mask)
    if f["fill"] >= SQUARE_FILL:
        return "square"
    if f["centroid"] >= TRIANGLE_CENTROID or f["skew"] >= TRIANGLE_SKEW:
        return "triangle"
    return "diamond" if f["taper"] >= DIAMOND_TAPER else "circle"


def classify_color(pixels: np.ndarray) -> int:
    """Index into PALETTE_NAMES of the nearest palette colour to the median of the more saturated half of
    (N, 3) RGB pixels."""
    pixels = pixels.astype(np.float32)
    strength = ((255.0 - pixels) ** 2).sum(1)
    median = np.median(pixels[strength >= np.median(strength)], axis=0)
    return int(((_PALETTE - median) ** 2).sum(1).argmin())


def _cell(cx: float, cy: float) -> int:
    col = min(int(cx * 3 // IMAGE_SIZE), 2)
    row = min(int(cy * 3 // IMAGE_SIZE), 2)
    return row * 3 + col


def _describe(mask: np.ndarray, color: int, y_off: int, x_off: int) -> DetectedObject:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    cx, cy = (x0 + x1) / 2 + x_off, (y0 + y1) / 2 + y_off
    return DetectedObject(
        shape=classify_shape(mask[y0:y1, x0:x1]),
        color=PALETTE_NAMES[color],
        size="large" if max(y1 - y0, x1 - x0) > SIZE_THRESHOLD else "small",
        cell=_cell(cx, cy), cx=float(cx), cy=float(cy), area=int(len(ys)),
    )


def _grow(mask: np.ndarray, radius: int) -> np.ndarray:
    pad = np.pad(mask, radius)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= pad[dy:dy + h, dx:dx + w]
    return out


def _split_region(image: np.ndarray, region: np.ndarray, min_area: int) -> list[tuple[np.ndarray, int]]:
    """Objects in a loose foreground region: [(object mask, colour index)].

    The region is peeled colour by colour: cut at half opacity of the colour of the remaining pixels, keep the
    parts, remove them (and a 1 px rim of their soft edges) and repeat, so that touching objects of different
    colours come apart.
    """
    deficit = _deficit(image)
    remaining = region.copy()
    out = []
    for _ in range(MAX_COLORS_PER_REGION):
        if remaining.sum() < min_area:
            break
        color = classify_color(image[remaining])
        labels, n = label_components(remaining & (color_opacity(deficit, color) >= FOREGROUND_OPACITY))
        taken = np.zeros_like(region)
        for k in range(1, n + 1):
            part = labels == k
            if part.sum() < min_area:
                continue
            own = classify_color(image[part])
            if own != color:  # a different colour that also projects strongly: re-cut with its own colour
                part = _grow(part, 1) & remaining & (color_opacity(deficit, own) >= FOREGROUND_OPACITY)
                if part.sum() < min_area:
                    continue
            out.append((part, own))
            taken |= part
        if not taken.any():
            break
        remaining &= ~_grow(taken, 1)
    return out


def detect(image: np.ndarray, min_area: int = MIN_AREA) -> list[DetectedObject]:
    """All objects in a uint8 (H, W, 3) RGB image, in raster order of their top-left pixel."""
    if isinstance(min_area, bool) or not isinstance(min_area, int) or min_area < 1:
        raise ValueError(f"min_area={min_area!r} must be a positive integer")
    image = _as_uint8_64(image)
    labels, n = label_components(opacity_map(image) >= LOOSE_OPACITY)
    objects = []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        if len(ys) < min_area:
            continue
        y0, y1 = max(ys.min() - 1, 0), ys.max() + 2
        x0, x1 = max(xs.min() - 1, 0), xs.max() + 2
        region = labels[y0:y1, x0:x1] == k
        for mask, color in _split_region(image[y0:y1, x0:x1], region, min_area):
            objects.append(_describe(mask, color, y0, x0))
    return objects
