"""Effective receptive fields (ERF) of a detector at ground-truth objects, measured as
tools/analysis_tools/erf.py and erf_seeds.py report them (:mod:`dk_mmdet.erf_figures` draws
them).

For every ground-truth box, the ERF of the feature-map unit nearest to the box centre (Luo et
al., NeurIPS 2016, as used by the Deformable Kernels paper): the gradient of that unit (summed
over the map's channels, or one channel) with respect to the input pixels, its magnitude
summed over the colour channels, normalised to sum 1. The model runs in eval mode on the
config's test pipeline; the gradient goes through the data preprocessor, so it is with respect
to the resized image's pixel values (0-255), not the normalised ones. Per object: the ERF's
spread ``erf_radius`` (radius around its centroid holding a given mass of it), ``box_size``
(square root of the box area, both in input pixels) and ``mass_in_box``; per model, the
least-squares slope of log(erf_radius) on log(box_size) (:func:`fit_log_log`).
"""
import argparse
import csv
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.config import DictAction
from torch import Tensor

from dk_mmdet.analysis import (AnnotatedImage, GroundTruthObject, ImageInput, box_centre,
                               read_annotated_images, run_to_layer, to_display_rgb, unit_index)

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


def size_of_box(box_xyxy: Sequence[float]) -> float:
    """Square root of the box's area."""
    x1, y1, x2, y2 = box_xyxy
    return float(np.sqrt((x2 - x1) * (y2 - y1)))


@dataclass
class ObjectERF:
    """One object's ERF in one model; coordinates in input pixels."""
    obj: GroundTruthObject
    box: Tuple[float, float, float, float]  # x1, y1, x2, y2
    unit: Tuple[int, int]  # (row, col) of the unit on the feature map
    unit_xy: Tuple[float, float]  # the unit's position in the input (unit i at i * stride)
    erf: np.ndarray  # (H, W), normalised to sum 1 (zero everywhere if the gradient is)
    radius: float  # erf_radius at the run's --mass


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


def gallery_picks(images: Sequence[AnnotatedImage], count: int) -> List[Tuple[int, int]]:
    """(image index, object index) of ``count`` objects spread evenly in rank over the objects'
    sizes, from the smallest to the largest."""
    by_size = sorted((size_of_box((x, y, x + w, y + h)), i, j)
                     for i, image in enumerate(images)
                     for j, (x, y, w, h) in enumerate(obj.bbox for obj in image.objects))
    ranks = np.unique(np.round(np.linspace(0, len(by_size) - 1, count)).astype(int))
    return [by_size[rank][1:] for rank in ranks] if by_size else []


def erf_scale_statistics(rows: List[dict], names: List[str]) -> dict:
    """Per model: its objects, the log-log fit of ERF radius on box size, and medians per COCO
    size range (erf_summary.json's ``models``)."""
    per_model = dict()
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
        per_model[name] = entry
    return per_model


def _median(values: np.ndarray) -> Optional[float]:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else None


def _mean(values: np.ndarray) -> Optional[float]:
    values = values[np.isfinite(values)]
    return float(np.mean(values)) if len(values) else None


def add_erf_arguments(parser: argparse.ArgumentParser) -> None:
    """The options tools/analysis_tools/erf.py shares with erf_seeds.py."""
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


def check_erf_arguments(parser: argparse.ArgumentParser, args) -> None:
    """``parser.error`` for the options of :func:`add_erf_arguments` out of range."""
    if not 0 < args.mass <= 1:
        parser.error(f'--mass must be in (0, 1], got {args.mass}')
    for option in ('max_images', 'max_objects', 'gallery_objects'):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f'--{option.replace("_", "-")} must be at least 1, got {value}')
