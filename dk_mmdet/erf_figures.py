"""The figures of tools/analysis_tools/erf.py and erf_seeds.py: ERFs (:mod:`dk_mmdet.erf`) over
their images, objects as columns and models as rows, and ERF radius against object size.

Each panel is normalised on its own ERF (:func:`erf_overlay`): an 'inferno' colour map, on a
log scale between the levels that enclose the ERF's hottest 10% and 95% of mass, over the image
in dimmed grey; the crop holds the box and 2.5 times the ERF radius.
"""
import io
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
from PIL import Image

from dk_mmdet.erf import ObjectERF, centroid, size_of_box

# The figures colour each ERF between two of its own levels: the level enclosing its hottest
# DISPLAY_MASS[0] of mass (and above) saturates, so that a few hot pixels do not set the scale;
# below the level enclosing DISPLAY_MASS[1] nothing is coloured. In between the scale is
# logarithmic: an ERF falls by two to three decades from its core to its tail, and a linear
# (or square root) scale shows the core only, a few pixels wide.
DISPLAY_MASS = (0.1, 0.95)
IMAGE_DIMMING = 0.5  # brightness of the greyscale image under the colours
COLOUR_MAP = 'inferno'  # perceptually uniform, readable in greyscale print


def mass_level(erf: np.ndarray, mass: float) -> float:
    """The value v such that the pixels of ERF >= v hold ``mass`` of its total (the boundary of
    the smallest region holding that mass)."""
    values = np.sort(erf.ravel())[::-1]
    cumulative = np.cumsum(values) / values.sum()
    return float(values[min(int(np.searchsorted(cumulative, mass - 1e-9)), len(values) - 1)])


def erf_overlay(rgb: np.ndarray, erf: np.ndarray) -> np.ndarray:
    """(H, W, 3) floats in [0, 1]: the ERF in COLOUR_MAP over the dimmed greyscale ``rgb``
    (H, W, 3) uint8, opaque where it saturates, fading to the image at DISPLAY_MASS[1]."""
    grey = np.repeat(rgb.mean(-1, keepdims=True) / 255 * IMAGE_DIMMING, 3, axis=-1)
    if not erf.sum() > 0:
        return grey
    high, low = (mass_level(erf, mass) for mass in DISPLAY_MASS)
    if high > low:
        value = np.log(np.maximum(erf, low) / low) / np.log(high / low)
    else:  # a flat ERF: every pixel of it is at the one level
        value = (erf >= high).astype(float)
    value = np.clip(value, 0, 1)[..., None]
    colour = plt.get_cmap(COLOUR_MAP)(value[..., 0])[..., :3]
    return grey * (1 - value) + colour * value


def draw_erf_panel(ax, rgb: np.ndarray, item: ObjectERF,
                   window: Optional[Tuple[float, float, float, float]] = None) -> None:
    """The ERF over the image, the box (green), the circle holding --mass of the ERF around
    its centroid (cyan, dashed) and the unit (white +); ``window`` (x1, y1, x2, y2) crops."""
    height, width = item.erf.shape
    # Pixel (row, col) covers [col, col + 1] x [row, row + 1], as the boxes assume.
    ax.imshow(erf_overlay(rgb, item.erf), extent=(0, width, height, 0), interpolation='nearest')
    x1, y1, x2, y2 = item.box
    ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor='lime',
                               linewidth=1))
    if np.isfinite(item.radius):
        ax.add_patch(plt.Circle(centroid(item.erf), max(item.radius, 0.5), fill=False,
                                edgecolor='cyan', linewidth=1.2, linestyle='--'))
    ax.plot(*item.unit_xy, marker='+', color='white', markersize=5, markeredgewidth=0.8)
    x1, y1, x2, y2 = window or (0, 0, width, height)
    ax.set_xlim(x1, x2)
    ax.set_ylim(y2, y1)
    ax.set_xticks([])
    ax.set_yticks([])


def crop_window(items: Sequence[ObjectERF], image_size: Tuple[int, int]):
    """A square (x1, y1, x2, y2) around the box of ``items`` (one object in several models),
    wide enough for the box and for 2.5 times the widest ERF radius (about the ERF's 95%
    circle for a Gaussian) around the box centre, inside the image where it fits."""
    height, width = image_size
    x1, y1, x2, y2 = items[0].box
    radii = [item.radius for item in items if np.isfinite(item.radius)]
    half = min(max(0.6 * max(x2 - x1, y2 - y1), 2.5 * max(radii, default=0), 16),
               max(height, width) / 2)
    centre = [min(max(middle, half), extent - half) if 2 * half <= extent else extent / 2
              for middle, extent in (((x1 + x2) / 2, width), ((y1 + y2) / 2, height))]
    return centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half


@dataclass
class GalleryColumn:
    """One object in every model: its figure column."""
    image_name: str
    rgbs: Dict[str, np.ndarray]  # per model, the display RGB of the image
    items: Dict[str, ObjectERF]  # per model, the object's ERF


def draw_erf_grid(path: str, title: str, columns: Sequence[GalleryColumn], mass: float) -> None:
    """Objects as columns, models as rows; each object cropped alike in every model."""
    names = list(columns[0].items)
    figure, axes = plt.subplots(len(names), len(columns), squeeze=False,
                                figsize=(1.8 * len(columns) + 0.3, 1.8 * len(names) + 0.7))
    for col, column in enumerate(columns):
        items = [column.items[name] for name in names]
        window = crop_window(items, items[0].erf.shape)
        axes[0][col].set_title(f'{items[0].obj.category}, {size_of_box(items[0].box):.0f} px\n'
                               f'{column.image_name} #{items[0].obj.ann_id}', fontsize=7)
        for row, (name, item) in enumerate(zip(names, items)):
            ax = axes[row][col]
            draw_erf_panel(ax, column.rgbs[name], item, window)
            ax.text(0.03, 0.97, f'r = {item.radius:.1f} px', transform=ax.transAxes,
                    fontsize=6, color='white', va='top')
            if col == 0:
                ax.set_ylabel(name, fontsize=7)
    low, high = DISPLAY_MASS
    figure.suptitle(f'{title}\nERF per panel, log scale: saturated on its hottest {low:.0%} of '
                    f'mass, fading out at {high:.0%}\ngreen: box (size: sqrt of its area); '
                    f'cyan, r: {mass:.0%} of the ERF around its centroid; +: the unit',
                    fontsize=6)
    figure.tight_layout()
    save_png(figure, path, dpi=90)
    plt.close(figure)


def save_png(figure, path: str, dpi: int) -> None:
    """The figure as a PNG of 256 colours: the image texture under the ERFs makes full-colour
    PNGs large, and the palette looks the same."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=dpi)
    Image.open(buffer).convert('RGB').quantize(256).save(path, optimize=True)


def draw_scale_figure(path: str, rows: List[dict], names: List[str], scale_statistics: dict,
                      layer: str) -> None:
    figure, ax = plt.subplots(figsize=(4.5, 3.5))
    for name in names:
        size = np.array([r['box_size'] for r in rows if r['model'] == name])
        radius = np.array([r['erf_radius'] for r in rows if r['model'] == name])
        fit = scale_statistics[name]
        slope = 'n/a' if fit['slope'] is None else f'{fit["slope"]:.2f}'
        ax.scatter(size, radius, s=8, alpha=0.6, label=f'{name} (slope {slope})')
    ax.set_xscale('log')
    ax.set_yscale('log')
    # Plain numbers at 1, 2, 5 x 10^k and no minor labels (labelled minor ticks overlap).
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel('box size sqrt(w h) [input px]')
    ax.set_ylabel('ERF radius [input px]')
    ax.set_title(f'ERF spread vs object size at {layer}', fontsize=8)
    ax.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
