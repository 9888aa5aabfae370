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

Figures: each panel is normalised on its own ERF (:func:`dk_mmdet.erf_figures.erf_overlay`):
an 'inferno' colour map, on a log scale between the levels that enclose the ERF's hottest 10%
and 95% of mass, over the image in dimmed grey; the crop holds the box and 2.5 times the ERF
radius. The slope over several seeds of each model: ``erf_seeds.py``.
"""
import argparse
import importlib.util
import json
import os
import os.path as osp
import sys

if importlib.util.find_spec('dk_mmdet') is None:
    # Run from a checkout without installing: use the repository's package.
    sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import matplotlib  # noqa: E402

matplotlib.use('Agg')
import numpy as np  # noqa: E402

from dk_mmdet.analysis import (ImageInput, default_ann_file, load_detector,  # noqa: E402
                               parse_model_arguments)
from dk_mmdet.erf import (add_erf_arguments, check_erf_arguments,  # noqa: E402
                          erf_scale_statistics, gallery_picks, object_erfs, object_row,
                          select_images, write_csv)
from dk_mmdet.erf_figures import GalleryColumn, draw_erf_grid, draw_scale_figure  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('models', nargs='+', metavar='CONFIG CHECKPOINT',
                        help='one or more config and checkpoint pairs')
    add_erf_arguments(parser)
    parser.add_argument('--names', nargs='+', help='model names (default: config file names)')
    args = parser.parse_args(argv)
    parse_model_arguments(parser, args)
    check_erf_arguments(parser, args)
    return args


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
                   models=erf_scale_statistics(rows, args.names))
    with open(osp.join(args.out, 'erf_summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    draw_scale_figure(osp.join(args.out, 'erf_scale.png'), rows, args.names, summary['models'],
                      args.layer)
    return summary


if __name__ == '__main__':
    main()
