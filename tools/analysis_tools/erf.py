"""Effective receptive fields (ERF) of detectors at ground-truth objects, side by side per model.

For every ground-truth box, the ERF of the feature-map unit nearest to the box centre (Luo et al.,
NeurIPS 2016, as used by the Deformable Kernels paper): the gradient of that unit (summed over
the map's channels, or one ``--channel``) with respect to the input pixels, its magnitude
summed over the colour channels, normalised to sum 1. The model runs in eval mode on the
config's test pipeline; the gradient goes through the data preprocessor, so it is with respect
to the resized image's pixel values (0-255), not the normalised ones.

    python tools/analysis_tools/erf.py \\
        configs/shapes/faster-rcnn_r50_fpn_shapes.py work_dirs/rigid/iter_800.pth \\
        configs/shapes/faster-rcnn_r50-dk-c3-c5_fpn_shapes.py work_dirs/dk/iter_800.pth \\
        --images data/shapes/val --layer backbone.layer3 --out erf_out

Writes to ``--out``:

- ``<image>.png``: per image, one column per object, one row per model, each object cropped
  alike in every model: the ERF over the image (see "Figures" below), the box, the circle
  holding ``--mass`` of the ERF around its centroid and a + at the unit's position (unit i of
  a map of stride s sits at i*s, see :mod:`dk_mmdet.analysis`);
- ``erf_gallery.png``: the same for ``--gallery-objects`` objects of all the images, from the
  smallest to the largest;
- ``arrays/<model>/<image>.npy``: (objects, H, W) float32 ERFs in input pixels;
- ``erf_objects.csv``: one row per (model, object), with the ERF's spread ``erf_radius``
  (radius around the ERF's centroid holding ``--mass`` of it), ``box_size`` (square root of
  the box area, both in input pixels), their ratio and ``mass_in_box`` (the part of the ERF
  that falls inside the box);
- ``erf_summary.json`` and ``erf_scale.png``: per model, the least-squares slope of
  log(erf_radius) on log(box_size) and their correlation (slope 0: one ERF size for every
  object; slope 1: ERF proportional to the object), and medians per COCO size range.

Figures: each panel is normalised on its own ERF (:func:`erf_overlay`): an 'inferno' colour
map, on a log scale between the levels that enclose the ERF's hottest 10% and 95% of mass,
over the image in dimmed grey; the crop holds the box and 2.5 times the ERF radius. The slope
over several seeds of each model: ``erf_seeds.py``.
"""
import argparse
import csv
import importlib.util
import io
import json
import os
import os.path as osp
import sys
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if importlib.util.find_spec('dk_mmdet') is None:
    # Run from a checkout without installing: use the repository's package.
    sys.path.insert(0, REPO_ROOT)

import matplotlib  # noqa: E402

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor  # noqa: E402

from dk_mmdet.analysis import (AnnotatedImage, GroundTruthObject, ImageInput,  # noqa: E402
                               box_centre, default_ann_file, load_detector,
                               parse_model_arguments, read_annotated_images, run_to_layer,
                               to_display_rgb, unit_index)

# COCO's object size ranges, by annotation area in original image pixels.
COCO_SIZE_RANGES = (('small', 0, 32**2), ('medium', 32**2, 96**2), ('large', 96**2, float('inf')))


def erf_maps(feature_fn: Callable[[Tensor], Tensor], pixels: Tensor,
             units: Sequence[Tuple[int, int]], channel: Optional[int] = None) -> Tensor:
    """Unnormalised ERFs (len(units), H, W) of the units (row, col) of ``feature_fn(pixels)``.

    ``pixels`` (C, H, W); ``feature_fn`` maps them to a (1, channels, h, w) feature map. Each
    ERF is |d unit / d pixels| summed over C, where the unit is the sum over the feature
    channels at (row, col), or the one ``channel``.
    """
    pixels = pixels.detach().requires_grad_(True)
    with torch.enable_grad():
        feature = feature_fn(pixels)
        maps = []
        for row, col in units:
            unit = feature[0, :, row, col].sum() if channel is None else feature[0, channel,
                                                                                 row, col]
            gradient, = torch.autograd.grad(unit, pixels, retain_graph=True, allow_unused=True)
            maps.append(torch.zeros_like(pixels[0]) if gradient is None
                        else gradient.abs().sum(0))
    return torch.stack(maps) if maps else pixels.new_zeros((0, *pixels.shape[1:]))


def normalise(erf: np.ndarray) -> np.ndarray:
    """The ERF divided by its sum (left at zero when it is zero everywhere)."""
    total = erf.sum()
    return erf / total if total > 0 else erf


def centroid(erf: np.ndarray) -> Tuple[float, float]:
    """(x, y) of the ERF's centre of mass; pixel (row, col) sits at (col + 0.5, row + 0.5)."""
    rows, cols = np.indices(erf.shape)
    total = erf.sum()
    return float((erf * (cols + 0.5)).sum() / total), float((erf * (rows + 0.5)).sum() / total)


def erf_radius(erf: np.ndarray, mass: float) -> float:
    """Smallest distance r from the centroid such that pixels within r hold ``mass`` of the
    ERF's total (NaN for an ERF that is zero everywhere)."""
    if not 0 < mass <= 1:
        raise ValueError(f'mass={mass} must be in (0, 1]')
    total = erf.sum()
    if total <= 0:
        return float('nan')
    x, y = centroid(erf)
    rows, cols = np.indices(erf.shape)
    distance = np.hypot(cols + 0.5 - x, rows + 0.5 - y).ravel()
    order = np.argsort(distance, kind='stable')
    cumulative = np.cumsum(erf.ravel()[order]) / total
    # Rounding can leave the full sum a hair under 1.
    first = min(int(np.searchsorted(cumulative, mass - 1e-9)), len(order) - 1)
    return float(distance[order[first]])


def mass_in_box(erf: np.ndarray, box_xyxy: Sequence[float]) -> float:
    """Part of the ERF on pixels whose centres lie inside the box (NaN for a zero ERF)."""
    total = erf.sum()
    if total <= 0:
        return float('nan')
    x1, y1, x2, y2 = box_xyxy
    rows, cols = np.indices(erf.shape)
    inside = (cols + 0.5 >= x1) & (cols + 0.5 < x2) & (rows + 0.5 >= y1) & (rows + 0.5 < y2)
    return float(erf[inside].sum() / total)


def size_range(area: float) -> str:
    return next(name for name, low, high in COCO_SIZE_RANGES if low <= area < high)


def fit_log_log(box_size: np.ndarray, radius: np.ndarray) -> Dict[str, Optional[float]]:
    """Slope and correlation of log(radius) on log(box_size), over the finite, positive pairs."""
    keep = np.isfinite(radius) & (radius > 0) & (box_size > 0)
    result = dict(fitted_objects=int(keep.sum()), slope=None, correlation=None)
    if keep.sum() >= 3 and np.ptp(np.log(box_size[keep])) > 0:
        log_size, log_radius = np.log(box_size[keep]), np.log(radius[keep])
        result['slope'] = float(np.polyfit(log_size, log_radius, 1)[0])
        if np.ptp(log_radius) > 0:
            result['correlation'] = float(np.corrcoef(log_size, log_radius)[0, 1])
    return result


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


@dataclass
class ObjectERF:
    """One object's ERF in one model; coordinates in input pixels."""
    obj: GroundTruthObject
    box: Tuple[float, float, float, float]  # x1, y1, x2, y2
    unit: Tuple[int, int]  # (row, col) of the unit on the feature map
    unit_xy: Tuple[float, float]  # the unit's position in the input (unit i at i * stride)
    erf: np.ndarray  # (H, W), normalised to sum 1 (zero everywhere if the gradient is)
    radius: float  # erf_radius at the run's --mass


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


def size_of_box(box_xyxy: Sequence[float]) -> float:
    """Square root of the box's area."""
    x1, y1, x2, y2 = box_xyxy
    return float(np.sqrt((x2 - x1) * (y2 - y1)))


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


def gallery_picks(images: Sequence[AnnotatedImage], count: int) -> List[Tuple[int, int]]:
    """(image index, object index) of ``count`` objects spread evenly in rank over the objects'
    sizes, from the smallest to the largest."""
    by_size = sorted((size_of_box((x, y, x + w, y + h)), i, j)
                     for i, image in enumerate(images)
                     for j, (x, y, w, h) in enumerate(obj.bbox for obj in image.objects))
    ranks = np.unique(np.round(np.linspace(0, len(by_size) - 1, count)).astype(int))
    return [by_size[rank][1:] for rank in ranks] if by_size else []


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('models', nargs='+', metavar='CONFIG CHECKPOINT',
                        help='one or more config and checkpoint pairs')
    add_common_arguments(parser)
    parser.add_argument('--names', nargs='+', help='model names (default: config file names)')
    args = parser.parse_args(argv)
    parse_model_arguments(parser, args)
    check_common_arguments(parser, args)
    return args


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options erf.py shares with erf_seeds.py."""
    parser.add_argument('--images', nargs='+', required=True,
                        help='image files, or folders whose images the annotation file lists')
    parser.add_argument('--ann', help='COCO annotation file with the boxes (default: the first '
                        'config\'s test annotation file)')
    parser.add_argument('--layer', required=True,
                        help='module whose output map holds the units, e.g. backbone.layer3 or '
                        'neck.fpn_convs.1')
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--channel', type=int,
                        help='differentiate this channel of the map (default: their sum)')
    parser.add_argument('--mass', type=float, default=0.5,
                        help='part of the ERF within erf_radius (default 0.5)')
    parser.add_argument('--max-images', type=int,
                        help='use the first N images with objects only')
    parser.add_argument('--max-objects', type=int,
                        help='use the first N objects only, in image order (one backward pass '
                        'per object and model)')
    parser.add_argument('--gallery-objects', type=int, default=4,
                        help='objects in erf_gallery.png, spread over the sizes (default 4)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='config overrides applied to every model')


def check_common_arguments(parser: argparse.ArgumentParser, args) -> None:
    if not 0 < args.mass <= 1:
        parser.error(f'--mass must be in (0, 1], got {args.mass}')
    for option in ('max_images', 'max_objects', 'gallery_objects'):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f'--{option.replace("_", "-")} must be at least 1, got {value}')


def select_images(ann_file: str, images: Sequence[str], max_images: Optional[int],
                  max_objects: Optional[int]) -> List[AnnotatedImage]:
    """The annotated images with objects, at most ``max_images`` of them holding at most
    ``max_objects`` objects in all (the first ones, in image order)."""
    selected, left = [], max_objects or float('inf')
    for image in read_annotated_images(ann_file, images):
        if len(selected) == (max_images or float('inf')) or left == 0:
            break
        if image.objects:
            kept = image.objects[:min(left, len(image.objects))]
            selected.append(replace(image, objects=kept))
            left -= len(kept)
    if not selected:
        raise ValueError(f'none of --images {list(images)} has a ground-truth object in '
                         f'{ann_file}')
    return selected


def draw_scale_figure(path: str, rows: List[dict], names: List[str], summary: dict,
                      layer: str) -> None:
    figure, ax = plt.subplots(figsize=(4.5, 3.5))
    for name in names:
        size = np.array([r['box_size'] for r in rows if r['model'] == name])
        radius = np.array([r['erf_radius'] for r in rows if r['model'] == name])
        fit = summary[name]
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


def summarise(rows: List[dict], names: List[str]) -> dict:
    summary = dict()
    for name in names:
        mine = [r for r in rows if r['model'] == name]
        size = np.array([r['box_size'] for r in mine], dtype=float)
        radius = np.array([r['erf_radius'] for r in mine], dtype=float)
        ratio = radius / size
        inside = np.array([r['mass_in_box'] for r in mine], dtype=float)
        entry = dict(objects=len(mine), zero_erf_objects=int(np.isnan(radius).sum()))
        entry.update(fit_log_log(size, radius))
        entry['median_radius_over_size'] = _median(ratio)
        entry['mean_mass_in_box'] = _mean(inside)
        entry['by_size'] = {
            range_name: dict(objects=int(sum(r['size_range'] == range_name for r in mine)),
                             median_erf_radius=_median(radius[[r['size_range'] == range_name
                                                               for r in mine]]),
                             median_radius_over_size=_median(ratio[[r['size_range'] ==
                                                                    range_name for r in mine]]))
            for range_name, _, _ in COCO_SIZE_RANGES}
        summary[name] = entry
    return summary


def _median(values: np.ndarray) -> Optional[float]:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else None


def _mean(values: np.ndarray) -> Optional[float]:
    values = values[np.isfinite(values)]
    return float(np.mean(values)) if len(values) else None


def object_erfs(model, image_input: ImageInput, image: AnnotatedImage, layer: str,
                channel: Optional[int], mass: float) -> Tuple[np.ndarray, List[ObjectERF]]:
    """One model on one image: (the display RGB (H, W, 3) uint8, the ERF of every object)."""
    pixels, sample, boxes = image_input(image)
    with torch.no_grad():
        probe = run_to_layer(model, layer, pixels, sample)
    feature_size, padded = tuple(probe.output.shape[-2:]), probe.padded_input_size
    if channel is not None and not 0 <= channel < probe.output.shape[1]:
        raise ValueError(f'--channel {channel} is not a channel of {layer}, which has '
                         f'{probe.output.shape[1]}')
    units = [unit_index(box_centre(box), feature_size, padded) for box in boxes]
    erfs = erf_maps(lambda p: run_to_layer(model, layer, p, sample).output, pixels, units,
                    channel).numpy()
    stride_y, stride_x = (p / f for p, f in zip(padded, feature_size))
    items = []
    for obj, box, (row, col), erf in zip(image.objects, boxes, units, erfs):
        erf = normalise(erf).astype(np.float32)
        items.append(ObjectERF(obj, tuple(box), (row, col), (col * stride_x, row * stride_y),
                               erf, erf_radius(erf, mass)))
    return to_display_rgb(pixels).numpy(), items


def object_row(name: str, image: AnnotatedImage, item: ObjectERF) -> dict:
    """The erf_objects.csv row of one object in one model (4 decimals: pixels to 1e-4)."""
    obj, size = item.obj, size_of_box(item.box)
    x1, y1, x2, y2 = (round(value, 4) for value in item.box)
    return dict(model=name, image=image.name, ann_id=obj.ann_id, category=obj.category,
                area=obj.area, size_range=size_range(obj.area), box_x1=x1, box_y1=y1,
                box_x2=x2, box_y2=y2, unit_row=item.unit[0], unit_col=item.unit[1],
                box_size=round(size, 4), erf_radius=round(item.radius, 4),
                radius_over_size=round(item.radius / size, 4),
                mass_in_box=round(mass_in_box(item.erf, item.box), 4))


def write_csv(path: str, rows: List[dict]) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    models = [load_detector(config, checkpoint, args.cfg_options)
              for config, checkpoint in args.pairs]
    inputs = [ImageInput(model.cfg) for model in models]
    images = select_images(args.ann or default_ann_file(models[0].cfg), args.images,
                           args.max_images, args.max_objects)
    picks = gallery_picks(images, args.gallery_objects)
    os.makedirs(args.out, exist_ok=True)
    rows, gallery = [], {}
    for image_index, image in enumerate(images):
        rgbs, items = {}, {}
        for name, model, image_input in zip(args.names, models, inputs):
            rgbs[name], items[name] = object_erfs(model, image_input, image, args.layer,
                                                  args.channel, args.mass)
            array_path = osp.join(args.out, 'arrays', name, f'{image.stem}.npy')
            os.makedirs(osp.dirname(array_path), exist_ok=True)
            np.save(array_path, np.stack([item.erf for item in items[name]]))
            rows += [dict(object_row(name, image, item),
                          array=osp.relpath(array_path, args.out), array_index=index)
                     for index, item in enumerate(items[name])]
        columns = [GalleryColumn(image.name, rgbs, {name: items[name][index] for name in items})
                   for index in range(len(image.objects))]
        draw_erf_grid(osp.join(args.out, f'{image.stem}.png'), f'ERF at {args.layer}',
                      columns, args.mass)
        gallery.update({pick: columns[pick[1]] for pick in picks if pick[0] == image_index})
    draw_erf_grid(osp.join(args.out, 'erf_gallery.png'),
                  f'ERF at {args.layer}, objects from small to large',
                  [gallery[pick] for pick in picks], args.mass)
    write_csv(osp.join(args.out, 'erf_objects.csv'), rows)
    summary = dict(layer=args.layer, channel=args.channel, mass=args.mass,
                   models=summarise(rows, args.names))
    with open(osp.join(args.out, 'erf_summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    draw_scale_figure(osp.join(args.out, 'erf_scale.png'), rows, args.names, summary['models'],
                      args.layer)
    return summary


if __name__ == '__main__':
    main()
