"""Generate "shapes": a small COCO-format detection and instance-segmentation dataset whose
objects differ from one another by geometric deformation, the variation Deformable Kernels are
meant to absorb.

Each instance is one of ``CLASSES``, resampled from a canonical template through a random scale,
aspect, rotation, shear and a smooth non-rigid warp, on a textured background with clutter
(strokes and blobs that are not objects). Objects are drawn largest first, so smaller ones may
hide part of larger ones (never more than half); every annotation describes the visible part
only. ``train`` and ``val`` draw deformations from ``TRAIN_RANGE``; ``test_hard`` draws them from
the wider ``HARD_RANGE``, so it measures whether a model adapts to deformation or memorises the
training range.

    python tools/data/make_shapes.py --out data/shapes

writes ``OUT/annotations/instances_{train,val,test_hard}.json`` and
``OUT/{train,val,test_hard}/*.png``. Masks are compressed RLE, because the ring's hole cannot be
written as COCO polygons; mmdet's ``LoadAnnotations`` reads them with its default
``poly2mask=True``. Every image is a pure function of (seed, split, image index), so a run is
byte-for-byte reproducible.

Each annotation also records its instance's ``deformation`` (readers skip keys they do not know:
pycocotools' COCOeval and mmdet's CocoDataset load these files as any COCO file), for analyses
per deformation strength (tools/analysis_tools/collect_results.py bins AP by it):

- ``size``: square root of the area the instance would cover unoccluded, in pixels (its split's
  ``DeformationRange.size`` times the image side; the visible ``area`` is at most a little more);
- ``aspect``: width/height stretch, in [1/aspect, aspect] of the range;
- ``rotation``: degrees, in [0, 360];
- ``shear``: shear factor, in [-shear, shear];
- ``warp``: largest displacement of the non-rigid warp, in canonical half-sides.

The canonical square [-1, 1]^2 maps to image pixels (before the warp) by
``size / (2 sqrt(fill)) * rotation @ shear @ stretch`` (``Deformation.linear_map``; ``fill``:
the fraction of the square the class's shape covers).
"""
import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CLASSES = ('star', 'cross', 'arrow', 'crescent', 'ring', 'heart')


@dataclass(frozen=True)
class DeformationRange:
    """Ranges that each instance's deformation is drawn from."""
    size: tuple  # square root of the unoccluded area, over the image side, log-uniform
    aspect: float  # width/height stretch, log-uniform in [1/aspect, aspect]
    shear: float  # shear factor, uniform in [-shear, shear]
    warp: tuple  # largest displacement of the non-rigid warp, in canonical half-sides, uniform


TRAIN_RANGE = DeformationRange(size=(0.05, 0.6), aspect=1.5, shear=0.3, warp=(0.0, 0.2))
HARD_RANGE = DeformationRange(size=(0.035, 0.7), aspect=2.2, shear=0.6, warp=(0.0, 0.4))

# split name -> (key mixed into every image's seed, deformation range)
SPLITS = {
    'train': (0, TRAIN_RANGE),
    'val': (1, TRAIN_RANGE),
    'test_hard': (2, HARD_RANGE),
}

TEMPLATE_SIZE = 256  # canonical shapes are rasterised once at this size, then resampled
MIN_AREA = 24  # pixels; smaller instances are left out, nothing recognisable is left of them
MIN_VISIBLE_FRACTION = 0.5  # no object may lose more than half of itself to occluders or the border
PLACEMENT_TRIES = 20  # positions tried per object before it is left out
MIN_COLOR_DISTANCE = 80.0  # RGB distance between an object and whatever lies under it


# ---------------------------------------------------------------- canonical shapes in [-1, 1]^2

def _template_grid():
    coords = np.linspace(-1.0, 1.0, TEMPLATE_SIZE)
    y, x = np.meshgrid(coords, coords, indexing='ij')
    return x, y


def _polygon(points):
    """Rasterise a polygon given in canonical coordinates (x right, y down)."""
    points = np.asarray(points, dtype=np.float64)
    points = points / np.abs(points).max() * 0.98  # every template spans the canonical square
    fixed_point = np.round((points + 1.0) * 0.5 * (TEMPLATE_SIZE - 1) * 16).astype(np.int32)
    canvas = np.zeros((TEMPLATE_SIZE, TEMPLATE_SIZE), np.uint8)
    cv2.fillPoly(canvas, [fixed_point], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _disc(center_x, center_y, radius):
    x, y = _template_grid()
    return (x - center_x) ** 2 + (y - center_y) ** 2 <= radius ** 2


def _star():
    angles = np.arange(10) * math.pi / 5 - math.pi / 2
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return _polygon(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1))


def _cross():
    w = 0.3
    return _polygon([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
                     (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)])


def _arrow():
    return _polygon([(-1, -0.22), (0.1, -0.22), (0.1, -0.75), (1, 0),
                     (0.1, 0.75), (0.1, 0.22), (-1, 0.22)])


def _crescent():
    return _disc(0.0, 0.0, 0.98) & ~_disc(0.42, -0.14, 0.8)


def _ring():
    return _disc(0.0, 0.0, 0.98) & ~_disc(0.0, 0.0, 0.58)


def _heart():
    t = np.linspace(0.0, 2 * math.pi, 240, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    y = y - (y.max() + y.min()) / 2  # centre the curve vertically before scaling it to the square
    return _polygon(np.stack([x, y], axis=1))


_TEMPLATE_BUILDERS = {'star': _star, 'cross': _cross, 'arrow': _arrow,
                      'crescent': _crescent, 'ring': _ring, 'heart': _heart}


@dataclass(frozen=True)
class Template:
    """A class's canonical shape, rasterised over the canonical square [-1, 1]^2."""
    coverage: np.ndarray  # float32 (TEMPLATE_SIZE, TEMPLATE_SIZE), 1 inside the shape
    fill: float  # fraction of the canonical square the shape covers
    hull: np.ndarray  # (2, N) canonical coordinates of the shape's convex hull


def _make_template(shape):
    contours, _ = cv2.findContours(shape.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.concatenate(contours)).reshape(-1, 2).T
    return Template(coverage=shape.astype(np.float32), fill=float(shape.mean()),
                    hull=hull * (2.0 / (TEMPLATE_SIZE - 1)) - 1.0)


_TEMPLATES = None


def templates():
    """One Template per class, in the order of CLASSES, built on first use."""
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = [_make_template(_TEMPLATE_BUILDERS[name]()) for name in CLASSES]
    return _TEMPLATES


# ---------------------------------------------------------------- one deformed instance

@dataclass(frozen=True)
class Deformation:
    """One instance's deformation: canonical square -> image, then a warp of the canonical frame."""
    size: float  # square root of the area the shape would cover unoccluded, in pixels
    scale: float  # half-side of the canonical square in pixels, before aspect and shear
    aspect: float
    rotation: float  # degrees
    shear: float
    warp: float  # largest warp displacement in canonical half-sides
    # per sine wave: (direction_x, direction_y, frequency, phase, displacement_x, displacement_y)
    warp_waves: tuple

    def linear_map(self):
        """2x2 matrix taking canonical coordinates to image pixel offsets from the centre."""
        theta = math.radians(self.rotation)
        cos, sin = math.cos(theta), math.sin(theta)
        rotation = np.array([[cos, -sin], [sin, cos]])
        shear = np.array([[1.0, self.shear], [0.0, 1.0]])
        stretch = np.diag([math.sqrt(self.aspect), 1.0 / math.sqrt(self.aspect)])
        return self.scale * rotation @ shear @ stretch

    def warp_displacement(self, x, y):
        """Smooth displacement of canonical points: a sum of a few long sine waves."""
        dx = np.zeros_like(x)
        dy = np.zeros_like(y)
        for direction_x, direction_y, frequency, phase, disp_x, disp_y in self.warp_waves:
            wave = np.sin(frequency * (direction_x * x + direction_y * y) + phase)
            dx += disp_x * wave
            dy += disp_y * wave
        return dx, dy

    def record(self):
        """The scalar parameters, as stored with each annotation."""
        return {'size': round(self.size, 2), 'aspect': round(self.aspect, 4),
                'rotation': round(self.rotation, 2), 'shear': round(self.shear, 4),
                'warp': round(self.warp, 4)}


def _log_uniform(rng, low, high):
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def sample_deformation(rng, deformation_range, image_size, template, num_waves=3):
    """Draw one instance's deformation from a DeformationRange."""
    size = _log_uniform(rng, *deformation_range.size) * image_size
    # aspect and shear keep the area, and the warp changes it little: size alone sets the scale
    scale = size / (2.0 * math.sqrt(template.fill))
    aspect = _log_uniform(rng, 1.0 / deformation_range.aspect, deformation_range.aspect)
    rotation = rng.uniform(0.0, 360.0)
    shear = rng.uniform(-deformation_range.shear, deformation_range.shear)
    warp = rng.uniform(*deformation_range.warp)
    waves = []
    for _ in range(num_waves):
        angle = rng.uniform(0.0, 2 * math.pi)
        # about half to one period across the canonical square: a bend, not a ripple
        frequency = rng.uniform(1.5, 3.5)
        phase = rng.uniform(0.0, 2 * math.pi)
        disp_angle = rng.uniform(0.0, 2 * math.pi)
        amplitude = warp / num_waves  # the waves together displace no point by more than `warp`
        waves.append((math.cos(angle), math.sin(angle), frequency, phase,
                      amplitude * math.cos(disp_angle), amplitude * math.sin(disp_angle)))
    return Deformation(size, scale, aspect, rotation, shear, warp, tuple(waves))


def instance_extent(template, deformation):
    """(low, high): the (x, y) pixel offsets from the centre that bound the deformed shape."""
    linear_map = deformation.linear_map()
    hull = linear_map @ template.hull
    # the warp reads the template at v + d(v) with |d| <= warp, so the shape grows by at most
    # `warp` canonical units, i.e. warp * |row of the linear map| pixels along each image axis
    margin = deformation.warp * np.linalg.norm(linear_map, axis=1)
    return hull.min(axis=1) - margin, hull.max(axis=1) + margin


def render_instance(template, deformation, center, image_size):
    """Coverage in [0, 1] of one deformed instance over the whole image, as float32 (H, W)."""
    coverage = np.zeros((image_size, image_size), np.float32)
    low, high = instance_extent(template, deformation)
    x0, y0 = (max(int(math.floor(center[k] + low[k])) - 1, 0) for k in (0, 1))
    x1, y1 = (min(int(math.ceil(center[k] + high[k])) + 1, image_size) for k in (0, 1))
    if x1 <= x0 or y1 <= y0:
        return coverage
    pixel_y, pixel_x = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    # pixel centre -> canonical point: invert the linear map, then warp the canonical frame
    inverse = np.linalg.inv(deformation.linear_map())
    offset_x = pixel_x + 0.5 - center[0]
    offset_y = pixel_y + 0.5 - center[1]
    canonical_x = inverse[0, 0] * offset_x + inverse[0, 1] * offset_y
    canonical_y = inverse[1, 0] * offset_x + inverse[1, 1] * offset_y
    warp_x, warp_y = deformation.warp_displacement(canonical_x, canonical_y)
    to_template = 0.5 * (TEMPLATE_SIZE - 1)
    map_x = ((canonical_x + warp_x + 1.0) * to_template).astype(np.float32)
    map_y = ((canonical_y + warp_y + 1.0) * to_template).astype(np.float32)
    coverage[y0:y1, x0:x1] = cv2.remap(template.coverage, map_x, map_y, cv2.INTER_LINEAR,
                                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return coverage


# ---------------------------------------------------------------- background, clutter, paint

def _smooth_field(rng, image_size, grid, channels, spread):
    """Low-frequency random field: a coarse random grid upsampled with bicubic interpolation."""
    coarse = rng.normal(0.0, spread, size=(grid, grid, channels)).astype(np.float32)
    field = cv2.resize(coarse, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
    return field.reshape(image_size, image_size, channels)


def _background(rng, image_size):
    """Textured background: base colour, smooth colour blotches, faint stripes and grain."""
    base = rng.uniform(60.0, 200.0, size=3)
    image = base + _smooth_field(rng, image_size, int(rng.integers(3, 7)), 3, 35.0)
    y, x = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    angle = rng.uniform(0.0, math.pi)
    period = rng.uniform(6.0, 30.0)
    stripes = np.sin(2 * math.pi / period * (x * math.cos(angle) + y * math.sin(angle)))
    image += rng.uniform(0.0, 20.0) * stripes[..., None]
    image += rng.normal(0.0, 6.0, size=image.shape)
    return image.astype(np.float32)


def _random_color(rng):
    return tuple(float(c) for c in rng.uniform(0.0, 255.0, size=3))


def _draw_clutter(rng, image, max_strokes=6, max_blobs=4):
    """Strokes and blobs that look like paint, not like any class; drawn below all objects."""
    size = image.shape[0]
    for _ in range(int(rng.integers(1, max_strokes + 1))):
        num_points = int(rng.integers(2, 6))
        start = rng.uniform(0.0, size, size=2)
        steps = rng.normal(0.0, size * 0.15, size=(num_points - 1, 2))
        points = np.vstack([start, start + np.cumsum(steps, axis=0)])
        cv2.polylines(image, [np.round(points).astype(np.int32)], False, _random_color(rng),
                      thickness=int(rng.integers(1, 4)), lineType=cv2.LINE_AA)
    for _ in range(int(rng.integers(0, max_blobs + 1))):
        # an irregular ellipse: its radius wobbles a little with the angle, too little to make lobes
        # (two or three big lobes would look like a heart)
        center = rng.uniform(0.0, size, size=2)
        radius = _log_uniform(rng, 0.02, 0.12) * size
        angles = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)
        wobble = sum(rng.uniform(0.0, 0.06) * np.sin(k * angles + rng.uniform(0, 2 * math.pi))
                     for k in (3, 4, 5))
        radii = radius * (1.0 + wobble)
        stretch = _log_uniform(rng, 1.0, 2.0)
        tilt = rng.uniform(0.0, math.pi)
        x, y = radii * np.cos(angles) * stretch, radii * np.sin(angles) / stretch
        points = center + np.stack([x * math.cos(tilt) - y * math.sin(tilt),
                                    x * math.sin(tilt) + y * math.cos(tilt)], axis=1)
        cv2.fillPoly(image, [np.round(points).astype(np.int32)], _random_color(rng),
                     lineType=cv2.LINE_AA)


def _contrasting_color(rng, references):
    """A colour at least MIN_COLOR_DISTANCE from every reference colour, or the farthest of a few
    tries, so that an object stands out from the background and from the objects it overlaps."""
    best, best_distance = None, -1.0
    for _ in range(10):
        color = rng.uniform(0.0, 255.0, size=3)
        distance = min(float(np.linalg.norm(color - reference)) for reference in references)
        if distance >= MIN_COLOR_DISTANCE:
            return color
        if distance > best_distance:
            best, best_distance = color, distance
    return best


def _paint_object(rng, image, coverage, color):
    """Composite a shaded, grainy fill of `color` through the instance's coverage, in place."""
    rows = np.flatnonzero(coverage.any(axis=1))
    cols = np.flatnonzero(coverage.any(axis=0))
    # one pixel of margin for the blur that anti-aliases the edges (the annotation keeps the
    # hard mask)
    y0, y1 = max(rows[0] - 1, 0), min(rows[-1] + 2, image.shape[0])
    x0, x1 = max(cols[0] - 1, 0), min(cols[-1] + 2, image.shape[1])
    alpha = cv2.GaussianBlur(coverage[y0:y1, x0:x1], (3, 3), 0.6)[..., None]
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    angle = rng.uniform(0.0, 2 * math.pi)
    shading = (x * math.cos(angle) + y * math.sin(angle)) / image.shape[0] * rng.uniform(0.0, 60.0)
    fill = color + shading[..., None] + rng.normal(0.0, 5.0, size=alpha.shape[:2] + (3,))
    window = image[y0:y1, x0:x1]
    window *= 1.0 - alpha
    window += alpha * fill


# ---------------------------------------------------------------- images and splits

def make_image(rng, image_size, num_objects, deformation_range):
    """Draw one image.

    Returns the uint8 BGR image and, per object, (class index, visible mask, Deformation).
    """
    shape_templates = templates()
    image = _background(rng, image_size)
    _draw_clutter(rng, image)
    owner = np.full((image_size, image_size), -1, np.int32)  # index of the object on top, per pixel
    placed = []  # (class index, deformation) of each object, bottom to top
    full_areas, visible_areas, colors = [], [], []  # per placed object: area when drawn, now, fill
    classes = rng.integers(len(CLASSES), size=num_objects)
    drawn = [(int(class_index), sample_deformation(rng, deformation_range, image_size,
                                                   shape_templates[class_index]))
             for class_index in classes]
    # largest first, so that big objects lie behind small ones: a big object on top would hide too
    # much of what is under it and be turned away, and the scale range would lose its large end
    drawn.sort(key=lambda item: -item[1].size)
    for class_index, deformation in drawn:
        # centres that keep the whole instance inside the image (or, when it is larger than the
        # image, that keep the image inside it)
        low, high = instance_extent(shape_templates[class_index], deformation)
        first_center = np.minimum(-low, image_size - high)
        last_center = np.maximum(-low, image_size - high)
        for _ in range(PLACEMENT_TRIES):
            center = rng.uniform(first_center, last_center)
            coverage = render_instance(shape_templates[class_index], deformation, center,
                                       image_size)
            mask = coverage >= 0.5
            area = np.count_nonzero(mask)
            if area < MIN_AREA:
                break  # too small to recognise wherever it goes
            if area < MIN_VISIBLE_FRACTION * deformation.size ** 2:
                continue  # mostly outside the image: try another place
            under = owner[mask]
            covered = np.bincount(under[under >= 0], minlength=len(placed))
            remaining = np.asarray(visible_areas, dtype=np.int64) - covered
            if np.any(remaining < MIN_VISIBLE_FRACTION * np.asarray(full_areas)):
                continue
            references = [colors[index] for index in np.flatnonzero(covered)]
            if np.any(under < 0):
                references.append(image[mask & (owner < 0)].mean(axis=0))
            colors.append(_contrasting_color(rng, references))
            _paint_object(rng, image, coverage, colors[-1])
            owner[mask] = len(placed)
            visible_areas = list(remaining)
            full_areas.append(area)
            visible_areas.append(full_areas[-1])
            placed.append((class_index, deformation))
            break
    objects = [(class_index, owner == index, deformation)
               for index, (class_index, deformation) in enumerate(placed)]
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


def mask_annotation(mask):
    """COCO fields of one binary mask: compressed RLE, area, and [x, y, w, h] box of its pixels."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    segmentation = {'size': [int(mask.shape[0]), int(mask.shape[1])],
                    'counts': rle['counts'].decode('ascii')}
    return segmentation, int(mask.sum()), bbox


def generate_split(out_dir, split, num_images, image_size, seed, min_objects, max_objects):
    """Write one split's images and annotation file; returns (annotation path, instance count)."""
    split_key, deformation_range = SPLITS[split]
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        # one generator per image: image i is the same whatever the number of images asked for
        rng = np.random.default_rng([seed, split_key, index])
        num_objects = int(rng.integers(min_objects, max_objects + 1))
        image, objects = make_image(rng, image_size, num_objects, deformation_range)
        file_name = f'{index:06d}.png'
        cv2.imwrite(os.path.join(image_dir, file_name), image)
        image_id = index + 1
        images.append({'id': image_id, 'file_name': file_name,
                       'width': image_size, 'height': image_size})
        for class_index, mask, deformation in objects:
            segmentation, area, bbox = mask_annotation(mask)
            annotations.append({
                'id': len(annotations) + 1,  # COCOeval treats id 0 as "unmatched": start at 1
                'image_id': image_id, 'category_id': class_index + 1,
                'bbox': bbox, 'area': area, 'segmentation': segmentation, 'iscrowd': 0,
                'deformation': deformation.record()})
    dataset = {
        'info': {'description': f'shapes, split {split}, from tools/data/make_shapes.py',
                 'seed': seed, 'deformation_range': asdict(deformation_range)},
        'images': images,
        'annotations': annotations,
        'categories': [{'id': i + 1, 'name': name, 'supercategory': 'shape'}
                       for i, name in enumerate(CLASSES)],
    }
    annotation_path = os.path.join(out_dir, 'annotations', f'instances_{split}.json')
    os.makedirs(os.path.dirname(annotation_path), exist_ok=True)
    with open(annotation_path, 'w') as f:
        json.dump(dataset, f)
    return annotation_path, len(annotations)


def _check_int(name, value, low, high=None):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f'{name} must be an int, got {type(value).__name__}')
    if value < low or (high is not None and value > high):
        bound = f'in [{low}, {high}]' if high is not None else f'>= {low}'
        raise ValueError(f'{name} must be {bound}, got {value}')


def generate(out_dir, num_train=200, num_val=50, num_hard=50, img_size=256, seed=0,
             min_objects=1, max_objects=6, verbose=False):
    """Generate every split with at least one image; returns {split: annotation json path}."""
    for name, value in (('num_train', num_train), ('num_val', num_val), ('num_hard', num_hard),
                        ('seed', seed)):
        _check_int(name, value, 0)
    _check_int('img_size', img_size, 64)
    # COCOeval scores at most 100 detections per image
    _check_int('min_objects', min_objects, 1, 100)
    _check_int('max_objects', max_objects, min_objects, 100)
    paths = {}
    for split, num_images in (('train', num_train), ('val', num_val), ('test_hard', num_hard)):
        if num_images == 0:
            continue
        start = time.perf_counter()
        paths[split], num_instances = generate_split(
            out_dir, split, num_images, img_size, seed, min_objects, max_objects)
        if verbose:
            print(f'{split}: {num_images} images, {num_instances} instances -> {paths[split]} '
                  f'and {os.path.join(out_dir, split)}/ ({time.perf_counter() - start:.1f} s)')
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='data/shapes', help='output directory')
    parser.add_argument('--num-train', type=int, default=200)
    parser.add_argument('--num-val', type=int, default=50)
    parser.add_argument('--num-hard', type=int, default=50, help='images in the test_hard split')
    parser.add_argument('--img-size', type=int, default=256, help='side of the square images')
    parser.add_argument('--min-objects', type=int, default=1,
                        help='objects tried per image, lower bound')
    parser.add_argument('--max-objects', type=int, default=6,
                        help='objects tried per image, upper bound')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    generate(args.out, num_train=args.num_train, num_val=args.num_val, num_hard=args.num_hard,
             img_size=args.img_size, seed=args.seed, min_objects=args.min_objects,
             max_objects=args.max_objects, verbose=True)


if __name__ == '__main__':
    main()
