"""The ERF-scale slope over seeds: does a variant's ERF follow the object's size, beyond seed noise?

For every model, erf.py's measurement at each ground-truth object (the spread ``erf_radius`` of
the ERF of the unit at the box centre) and the least-squares slope of log(erf_radius) on
log(box_size) over the objects: one slope per seed. Per variant (the models given the same
NAME), the mean slope over its seeds, their standard deviation (n - 1) and the 95% Student t
interval of the mean, mean +- t(0.975, n - 1) * sd / sqrt(n); with ``--baseline``, each
variant's difference to the baseline variant paired by seed, d_k = slope_k - baseline_k, as its
mean and t interval (dk_mmdet/results/seed_statistics.py, as collect_results.py reports AP).

    python tools/analysis_tools/erf_seeds.py \\
        --model rigid configs/shapes/faster-rcnn_r50_fpn_shapes.py rigid/seed0/iter_800.pth \\
        --model rigid configs/shapes/faster-rcnn_r50_fpn_shapes.py rigid/seed1/iter_800.pth \\
        --model DK configs/shapes/faster-rcnn_r50-dk-c3-c5_fpn_shapes.py dk/seed0/iter_800.pth \\
        --model DK configs/shapes/faster-rcnn_r50-dk-c3-c5_fpn_shapes.py dk/seed1/iter_800.pth \\
        --baseline rigid --images data/shapes/val --layer backbone.layer3 --out erf_seeds_out

Seeds pair by the ``seed<k>`` folder in the checkpoint paths when every path has one (the
layout of a study, see docs/statistics.md), else by their order among the variant's
``--model`` options. Every model sees the same objects (``--max-images``, ``--max-objects``:
the first ones); one backward pass per object and model, one model in memory at a time.

Writes to ``--out``:

- ``erf_seeds.md`` and ``erf_seeds.csv``: per variant, the slopes of its seeds, their mean, sd
  and interval, and the paired difference to the baseline with its interval;
- ``erf_seed_slopes.csv``: per model, its slope (in full: the tables' means, sds and intervals
  are computed from these values), the correlation of the logs and the objects fitted;
- ``erf_objects.csv``: per model and object, erf.py's columns (``model``: the variant) and
  ``seed``;
- ``erf_gallery.png``: the first seed of each variant (rows) at ``--gallery-objects`` objects
  from the smallest to the largest (columns), drawn as erf.py draws them.
"""
import argparse
import importlib.util
import os
import os.path as osp
import sys
from typing import List

if importlib.util.find_spec('dk_mmdet') is None:
    # Run from a checkout without installing: use the repository's package.
    sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from dk_mmdet.analysis import ImageInput, default_ann_file, load_detector  # noqa: E402
from dk_mmdet.erf import (add_erf_arguments, check_erf_arguments, gallery_picks,  # noqa: E402
                          object_erfs, object_row, select_images, write_csv)
from dk_mmdet.erf_figures import GalleryColumn, draw_erf_grid  # noqa: E402
from dk_mmdet.results.erf_slopes import (VariantSlope, full_number, number,  # noqa: E402
                                         seed_checkpoints, slopes_by_seed, slopes_markdown,
                                         variant_slopes, write_slopes_csv)

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', nargs=3, action='append', required=True,
                        metavar=('NAME', 'CONFIG', 'CHECKPOINT'),
                        help='one seed of the variant NAME; repeat for every seed and variant')
    parser.add_argument('--baseline', help='the variant NAME the others are compared with')
    add_erf_arguments(parser)
    args = parser.parse_args(argv)
    check_erf_arguments(parser, args)
    try:
        args.checkpoints = seed_checkpoints(args.model)
    except ValueError as error:
        parser.error(str(error))
    variants = list(dict.fromkeys(model.variant for model in args.checkpoints))
    if args.baseline is not None and args.baseline not in variants:
        parser.error(f'--baseline {args.baseline} is not a --model NAME (names: '
                     f'{", ".join(variants)})')
    return args


def main(argv=None) -> List[VariantSlope]:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows, seed_rows, gallery, images, picks = [], [], {}, None, None
    drawn = set()  # the variants in the gallery: their first seed
    for seed_checkpoint in args.checkpoints:
        model = load_detector(seed_checkpoint.config, seed_checkpoint.checkpoint,
                              args.cfg_options)
        image_input = ImageInput(model.cfg)
        if images is None:  # the first model's test annotations, unless --ann
            images = select_images(args.ann or default_ann_file(model.cfg), args.images,
                                   args.max_images, args.max_objects)
            picks = gallery_picks(images, args.gallery_objects)
        first_seed = seed_checkpoint.variant not in drawn
        drawn.add(seed_checkpoint.variant)
        model_rows = []
        for image_index, image in enumerate(images):
            rgb, items = object_erfs(model, image_input, image, args.layer, args.channel,
                                     args.mass)
            model_rows += [dict(object_row(seed_checkpoint.variant, image, item),
                                seed=seed_checkpoint.seed) for item in items]
            for pick in (picks if first_seed else []):
                if pick[0] == image_index:
                    column = gallery.setdefault(pick, GalleryColumn(image.name, {}, {}))
                    column.rgbs[seed_checkpoint.variant] = rgb
                    column.items[seed_checkpoint.variant] = items[pick[1]]
        rows += model_rows
        fit = slopes_by_seed(model_rows)[seed_checkpoint.variant][seed_checkpoint.seed]
        seed_rows.append(dict(variant=seed_checkpoint.variant, seed=seed_checkpoint.seed,
                              slope=full_number(fit['slope']),
                              correlation=number(fit['correlation']),
                              fitted_objects=fit['fitted_objects'],
                              config=seed_checkpoint.config,
                              checkpoint=seed_checkpoint.checkpoint))
    write_csv(osp.join(args.out, 'erf_objects.csv'), rows)
    write_csv(osp.join(args.out, 'erf_seed_slopes.csv'), seed_rows)
    fits = slopes_by_seed(rows)
    results = variant_slopes({variant: {seed: fit['slope'] for seed, fit in by_seed.items()}
                              for variant, by_seed in fits.items()}, args.baseline)
    with open(osp.join(args.out, 'erf_seeds.md'), 'w') as f:
        f.write(slopes_markdown(results, args.layer, args.mass,
                                sum(len(image.objects) for image in images)))
    write_slopes_csv(osp.join(args.out, 'erf_seeds.csv'), results)
    draw_erf_grid(osp.join(args.out, 'erf_gallery.png'),
                  f'ERF at {args.layer} (first seed of each variant), objects from small to '
                  'large', [gallery[pick] for pick in picks], args.mass)
    return results


if __name__ == '__main__':
    main()
