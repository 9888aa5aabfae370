"""How far each trained model's offsets moved from their rigid start (0), per backbone stage:
the mean length of a tap's (dy, dx), kernel offsets in scope cells and data offsets in input
pixels (dk_mmdet/offsets.py), over the images given.

    python tools/analysis_tools/offset_magnitudes.py CONFIG CHECKPOINT [CONFIG CHECKPOINT ...] \\
        --images data/shapes/val [--max-images 50] [--names NAME ...] --out offsets.csv

Writes one CSV row per model, stage and kind (model, stage, kind, mean_move, images) and prints
them as a table.
"""
import argparse
import csv
import importlib.util
import os
import os.path as osp
import sys

if importlib.util.find_spec('dk_mmdet') is None:
    # Run from a checkout without installing: use the repository's package.
    sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from dk_mmdet.analysis import (ImageInput, default_ann_file, load_detector,  # noqa: E402
                               parse_model_arguments, read_annotated_images)
from dk_mmdet.offsets import offset_magnitudes  # noqa: E402
from dk_mmdet.results.tables import markdown_table  # noqa: E402

FIELDS = ('model', 'stage', 'kind', 'mean_move', 'images')
UNITS = {'kernel': 'scope cells', 'data': 'pixels'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('models', nargs='+', metavar='CONFIG CHECKPOINT')
    parser.add_argument('--names', nargs='+', help='a name per model (default: config names)')
    parser.add_argument('--images', nargs='+', required=True,
                        help='image files or folders (their objects need not be annotated)')
    parser.add_argument('--ann', help='COCO file listing the images (default: the config\'s '
                        'test annotation file)')
    parser.add_argument('--max-images', type=int, default=50)
    parser.add_argument('--out', required=True, help='CSV file to write')
    args = parser.parse_args(argv)
    parse_model_arguments(parser, args)
    return args


def main(argv=None) -> list:
    args = parse_args(argv)
    rows = []
    for name, (config, checkpoint) in zip(args.names, args.pairs):
        model = load_detector(config, checkpoint)
        images = read_annotated_images(args.ann or default_ann_file(model.cfg),
                                       args.images)[:args.max_images]
        image_input = ImageInput(model.cfg)

        def run_image(image):
            pixels, sample, _ = image_input(image)
            data = model.data_preprocessor(dict(inputs=[pixels], data_samples=[sample]), False)
            model.extract_feat(data['inputs'])

        for (stage, kind), move in offset_magnitudes(model, run_image, images).items():
            rows.append(dict(model=name, stage=stage, kind=kind, mean_move=f'{move:.3f}',
                             images=len(images)))
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print('\n'.join(markdown_table(
        ('model', 'stage', 'offsets', 'mean move'),
        [[row['model'], row['stage'], row['kind'], f"{row['mean_move']} {UNITS[row['kind']]}"]
         for row in rows])))
    return rows


if __name__ == '__main__':
    main()
