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

- ``<image>.png``: per image, one row per object, one column per model: the ERF over the
  image (transparent where it is zero), the box, and a stride-sized square around the unit's
  position (unit i of a map of stride s sits at i*s, see :mod:`dk_mmdet.analysis`);
- ``arrays/<model>/<image>.npy``: (objects, H, W) float32 ERFs in input pixels;
- ``erf_objects.csv``: one row per (model, object), with the ERF's spread ``erf_radius``
  (radius around the ERF's centroid holding ``--mass`` of it), ``box_size`` (square root of
  the box area, both in input pixels), their ratio and ``mass_in_box`` (the part of the ERF
  that falls inside the box);
- ``erf_summary.json`` and ``erf_scale.png``: per model, the least-squares slope of
  log(erf_radius) on log(box_size) and their correlation (slope 0: one ERF size for every
  object; slope 1: ERF proportional to the object), and medians per COCO size range.
"""
import argparse
import csv
import importlib.util
import json
import os
import os.path as osp
import sys
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
from torch import Tensor  # noqa: E402

from dk_mmdet.analysis import (ImageInput, box_centre, default_ann_file,  # noqa: E402
                               load_detector, model_name, pair_models, read_annotated_images,
                               run_to_layer, to_display_rgb, unit_index)

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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('models', nargs='+', metavar='CONFIG CHECKPOINT',
                        help='one or more config and checkpoint pairs')
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
    parser.add_argument('--names', nargs='+', help='model names (default: config file names)')
    parser.add_argument('--max-images', type=int, help='use the first N images only')
    parser.add_argument('--display-gamma', type=float, default=0.5,
                        help='figures show (ERF / max) ** gamma, so that its tails show')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='config overrides applied to every model')
    args = parser.parse_args(argv)
    try:
        args.pairs = pair_models(args.models)
    except ValueError as error:
        parser.error(str(error))
    args.names = args.names or [model_name(config) for config, _ in args.pairs]
    if len(args.names) != len(args.pairs) or len(set(args.names)) != len(args.names):
        parser.error(f'--names needs one distinct name per model, got {args.names} for '
                     f'{len(args.pairs)} models')
    if not 0 < args.mass <= 1:
        parser.error(f'--mass must be in (0, 1], got {args.mass}')
    return args


def draw_image_figure(path: str, image_label: str, objects, names: List[str], cells,
                      gamma: float) -> None:
    """cells[model][object] = (display RGB, ERF, box xyxy, unit cell xyxy)."""
    rows, cols = len(objects), len(names)
    figure, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), squeeze=False)
    for col, name in enumerate(names):
        for row, obj in enumerate(objects):
            rgb, erf, box, cell = cells[name][row]
            ax = axes[row][col]
            ax.imshow(rgb.mean(-1), cmap='gray', vmin=0, vmax=255)
            peak = erf.max()
            if peak > 0:
                value = (erf / peak)**gamma
                overlay = plt.get_cmap('jet')(value)
                overlay[..., 3] = value
                ax.imshow(overlay)
            for (x1, y1, x2, y2), colour in ((box, 'lime'), (cell, 'white')):
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False,
                                           edgecolor=colour, linewidth=1))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
            if col == 0:
                ax.set_ylabel(f'{obj.category} #{obj.ann_id}', fontsize=7)
    figure.suptitle(f'{image_label}: ERF (jet, (ERF/max)^{gamma:g}), box (green), unit (white)',
                    fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


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


def analyse_image(name: str, model, image_input: ImageInput, image, args) -> Tuple[list, list]:
    """One model on one image: saves the ERF arrays; returns the CSV rows and figure cells."""
    pixels, sample, boxes = image_input(image)
    with torch.no_grad():
        probe = run_to_layer(model, args.layer, pixels, sample)
    feature_size, padded = tuple(probe.output.shape[-2:]), probe.padded_input_size
    if args.channel is not None and not 0 <= args.channel < probe.output.shape[1]:
        raise ValueError(f'--channel {args.channel} is not a channel of {args.layer}, which '
                         f'has {probe.output.shape[1]}')
    units = [unit_index(box_centre(box), feature_size, padded) for box in boxes]
    erfs = erf_maps(lambda p: run_to_layer(model, args.layer, p, sample).output, pixels, units,
                    args.channel).numpy()
    erfs = np.stack([normalise(erf) for erf in erfs]).astype(np.float32)
    array_path = osp.join(args.out, 'arrays', name, f'{image.stem}.npy')
    os.makedirs(osp.dirname(array_path), exist_ok=True)
    np.save(array_path, erfs)

    stride_y, stride_x = (p / f for p, f in zip(padded, feature_size))
    rgb = to_display_rgb(pixels).numpy()
    rows, cells = [], []
    for index, (obj, box, (row, col), erf) in enumerate(zip(image.objects, boxes, units, erfs)):
        box_size = float(np.sqrt((box[2] - box[0]) * (box[3] - box[1])))
        radius = erf_radius(erf, args.mass)
        rows.append(dict(
            model=name, image=image.name, ann_id=obj.ann_id,
            category=obj.category, area=obj.area, size_range=size_range(obj.area),
            box_x1=box[0], box_y1=box[1], box_x2=box[2], box_y2=box[3], unit_row=row,
            unit_col=col, box_size=box_size, erf_radius=radius,
            radius_over_size=radius / box_size, mass_in_box=mass_in_box(erf, box),
            array=osp.relpath(array_path, args.out), array_index=index))
        cell = ((col - 0.5) * stride_x, (row - 0.5) * stride_y, (col + 0.5) * stride_x,
                (row + 0.5) * stride_y)
        cells.append((rgb, erf, box, cell))
    return rows, cells


def main(argv=None) -> dict:
    args = parse_args(argv)
    models = [load_detector(config, checkpoint, args.cfg_options)
              for config, checkpoint in args.pairs]
    inputs = [ImageInput(model.cfg) for model in models]
    images = read_annotated_images(args.ann or default_ann_file(models[0].cfg), args.images)
    images = [image for image in images if image.objects][:args.max_images]
    if not images:
        raise ValueError(f'none of --images {args.images} has a ground-truth object')
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for image in images:
        cells = {}
        for name, model, image_input in zip(args.names, models, inputs):
            image_rows, cells[name] = analyse_image(name, model, image_input, image, args)
            rows += image_rows
        draw_image_figure(osp.join(args.out, f'{image.stem}.png'), image.name,
                          image.objects, args.names, cells, args.display_gamma)
    with open(osp.join(args.out, 'erf_objects.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = dict(layer=args.layer, channel=args.channel, mass=args.mass,
                   models=summarise(rows, args.names))
    with open(osp.join(args.out, 'erf_summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    draw_scale_figure(osp.join(args.out, 'erf_scale.png'), rows, args.names, summary['models'],
                      args.layer)
    return summary


if __name__ == '__main__':
    main()
