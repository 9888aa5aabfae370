"""t-SNE maps of what dynamic convolutions compute per object, coloured by object size and class.

For every ground-truth object, the control units of one dynamic layer at the object's centre:

- local DK (``DK``): its kernel offsets, 2*G*K*K values per output location;
- global DK (``DKGlobal``): its kernel offsets, one vector per image;
- DK + DCN (``DKDCN``, ``DKDCNv2``): kernel offsets followed by data offsets;
- DCN, DCNv2 (mmcv's ``DCN``, ``DCNv2``): data offsets (DCNv2 without its mask);
- CondConv (``CondConv``): routing weights, one vector per image.

The units come from calling the layer's generators on the input the layer received while
the model ran on the config's test pipeline (eval mode). A per-image operator gives every
object of an image the same vector. The units of each model are embedded with t-SNE
(scikit-learn) and plotted twice, coloured by object size and by class; as numbers, the
leave-one-out k-nearest-neighbour agreement in the units themselves (before t-SNE): how often
the neighbours' majority class is the object's class, and the R^2 of predicting log object
size by the neighbours' mean; and their mean absolute value, how far the operator has moved
from its rigid start.

    python tools/analysis_tools/tsne.py \\
        configs/shapes/faster-rcnn_r50-dk-c3-c5_fpn_shapes.py work_dirs/dk/iter_800.pth \\
        configs/shapes/faster-rcnn_r50-condconv-c3-c5_fpn_shapes.py work_dirs/cc/iter_800.pth \\
        --images data/shapes/val --out tsne_out

Writes ``tsne.png``, ``objects.csv`` (one row per object, in the order of the arrays),
``<model>_units.npy`` (objects, units), ``<model>_tsne.npy`` (objects, 2) and
``tsne_summary.json``.
"""
import argparse
import csv
import importlib.util
import json
import os
import os.path as osp
import sys
from typing import List, Optional, Tuple

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if importlib.util.find_spec('dk_mmdet') is None:
    # Run from a checkout without installing: use the repository's package.
    sys.path.insert(0, REPO_ROOT)

import matplotlib  # noqa: E402

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import dk_ops  # noqa: E402
from dk_mmdet.analysis import (ImageInput, box_centre, default_ann_file,  # noqa: E402
                               load_detector, parse_model_arguments, read_annotated_images,
                               run_to_layer, unit_index)
from dk_mmdet.cond_conv import CondConv2d  # noqa: E402
from dk_mmdet.offsets import OFFSET_LAYER_TYPES, generated_offsets  # noqa: E402

DYNAMIC_LAYER_TYPES = (*OFFSET_LAYER_TYPES, CondConv2d)


def control_units(layer: nn.Module, layer_input: Tensor) -> Tuple[Tensor, str]:
    """The layer's control units for ``layer_input``, (N, D, H_out, W_out) for operators that
    vary per location or (N, D) per image, and what they are."""
    if isinstance(layer, CondConv2d):
        return layer.routing(layer_input), 'routing weights (per image)'
    if not isinstance(layer, OFFSET_LAYER_TYPES):
        raise TypeError(f'{type(layer).__name__} has no control units; supported layers: '
                        f'{[cls.__name__ for cls in DYNAMIC_LAYER_TYPES]}')
    offsets = generated_offsets(layer, layer_input)
    description = ' + '.join(f'{kind} offsets' for kind in offsets)
    if isinstance(layer, dk_ops.GlobalDeformKernel2d):
        description += ' (per image)'
    return torch.cat(list(offsets.values()), 1), description


def last_dynamic_layer(model: nn.Module) -> str:
    """Name of the backbone's last dynamic layer."""
    names = [name for name, module in model.named_modules()
             if name.startswith('backbone.') and isinstance(module, DYNAMIC_LAYER_TYPES)]
    if not names:
        raise ValueError('the backbone has no dynamic layer (DK, DCN or CondConv); a rigid '
                         'model has no control units')
    return names[-1]


def units_at_objects(model: nn.Module, layer_name: str, image_input: ImageInput,
                     image) -> Tuple[np.ndarray, str]:
    """(objects, D) control units of ``layer_name`` at the centres of ``image``'s objects."""
    layer = dict(model.named_modules())[layer_name]
    pixels, sample, boxes = image_input(image)
    with torch.no_grad():
        call = run_to_layer(model, layer_name, pixels, sample)
        units, description = control_units(layer, call.input)
    vectors = []
    for box in boxes:
        if units.dim() == 2:
            vectors.append(units[0])
        else:
            row, col = unit_index(box_centre(box), units.shape[-2:], call.padded_input_size)
            vectors.append(units[0, :, row, col])
    return torch.stack(vectors).numpy(), description


def neighbour_agreement(units: np.ndarray, classes: List[str], log_size: np.ndarray,
                        neighbours: int) -> dict:
    """Leave-one-out k-nearest-neighbour class accuracy and log-size R^2 in unit space."""
    count = len(units)
    k = min(neighbours, count - 1)
    distance = np.linalg.norm(units[:, None] - units[None], axis=-1)
    np.fill_diagonal(distance, np.inf)
    nearest = np.argsort(distance, axis=1, kind='stable')[:, :k]
    labels = np.array(classes)
    predicted = []
    for row in nearest:
        names, votes = np.unique(labels[row], return_counts=True)
        # Ties go to the class of the nearer neighbour.
        tied = set(names[votes == votes.max()])
        predicted.append(next(label for label in labels[row] if label in tied))
    accuracy = float(np.mean(np.array(predicted) == labels))
    _, class_counts = np.unique(labels, return_counts=True)
    residual = ((log_size - log_size[nearest].mean(1))**2).sum()
    spread = ((log_size - log_size.mean())**2).sum()
    return dict(neighbours=k, knn_class_accuracy=accuracy,
                majority_class_rate=float(class_counts.max() / count),
                knn_log_size_r2=float(1 - residual / spread) if spread > 0 else None)


def embed(units: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    # t-SNE needs perplexity < number of points; random init copes with identical points.
    perplexity = min(perplexity, max(1.0, (len(units) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init='random',
                random_state=seed).fit_transform(units.astype(np.float64))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('models', nargs='+', metavar='CONFIG CHECKPOINT',
                        help='one or more config and checkpoint pairs')
    parser.add_argument('--images', nargs='+', required=True,
                        help='image files, or folders whose images the annotation file lists')
    parser.add_argument('--ann', help='COCO annotation file with the boxes (default: the first '
                        'config\'s test annotation file)')
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--layer', help='the dynamic layer, e.g. backbone.layer4.2.conv2 '
                        '(default: the last one of each model\'s backbone)')
    parser.add_argument('--names', nargs='+', help='model names (default: config file names)')
    parser.add_argument('--max-images', type=int, help='use the first N images only')
    parser.add_argument('--perplexity', type=float, default=30.0)
    parser.add_argument('--neighbours', type=int, default=5,
                        help='k of the k-nearest-neighbour agreement (default 5)')
    parser.add_argument('--seed', type=int, default=0, help='t-SNE random state')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='config overrides applied to every model')
    args = parser.parse_args(argv)
    parse_model_arguments(parser, args)
    return args


def draw(path: str, results: List[dict], objects: List[dict]) -> None:
    log_size = np.log2([obj['size'] for obj in objects])
    classes = sorted({obj['category'] for obj in objects})
    class_index = np.array([classes.index(obj['category']) for obj in objects])
    palette = plt.get_cmap('tab10')
    figure, axes = plt.subplots(len(results), 2, figsize=(7, 3.2 * len(results)),
                                squeeze=False)
    for (by_size, by_class), result in zip(axes, results):
        xy = result['embedding']
        points = by_size.scatter(xy[:, 0], xy[:, 1], c=log_size, cmap='viridis', s=10)
        figure.colorbar(points, ax=by_size, label='log2 object size [px]')
        for index, name in enumerate(classes):
            chosen = class_index == index
            by_class.scatter(xy[chosen, 0], xy[chosen, 1], s=10, color=palette(index % 10),
                             label=name)
        by_class.legend(fontsize=6, markerscale=1.5)
        title = f'{result["name"]}\n{result["layer"]}: {result["description"]}'
        by_size.set_title(f'{title}\nby size (kNN log-size R2 '
                          f'{_format(result["stats"]["knn_log_size_r2"])})', fontsize=7)
        by_class.set_title(f'{title}\nby class (kNN accuracy '
                           f'{_format(result["stats"]["knn_class_accuracy"])})', fontsize=7)
        for ax in (by_size, by_class):
            ax.set_xticks([])
            ax.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _format(value: Optional[float]) -> str:
    return 'n/a' if value is None else f'{value:.2f}'


def main(argv=None) -> dict:
    args = parse_args(argv)
    models = [load_detector(config, checkpoint, args.cfg_options)
              for config, checkpoint in args.pairs]
    images = read_annotated_images(args.ann or default_ann_file(models[0].cfg), args.images)
    images = [image for image in images if image.objects][:args.max_images]
    objects = [dict(image=image.name, ann_id=obj.ann_id, category=obj.category,
                    bbox_x=obj.bbox[0], bbox_y=obj.bbox[1], bbox_w=obj.bbox[2],
                    bbox_h=obj.bbox[3], area=obj.area,
                    size=float(np.sqrt(obj.bbox[2] * obj.bbox[3])))
               for image in images for obj in image.objects]
    if len(objects) < 5:
        raise ValueError(f'--images hold {len(objects)} ground-truth objects; t-SNE needs at '
                         'least 5')
    os.makedirs(args.out, exist_ok=True)
    log_size = np.log([obj['size'] for obj in objects])
    results = []
    for name, model in zip(args.names, models):
        layer_name = args.layer or last_dynamic_layer(model)
        image_input = ImageInput(model.cfg)
        per_image = [units_at_objects(model, layer_name, image_input, image) for image in images]
        units = np.concatenate([vectors for vectors, _ in per_image])
        embedding = embed(units, args.perplexity, args.seed)
        np.save(osp.join(args.out, f'{name}_units.npy'), units.astype(np.float32))
        np.save(osp.join(args.out, f'{name}_tsne.npy'), embedding.astype(np.float32))
        stats = neighbour_agreement(units, [obj['category'] for obj in objects], log_size,
                                    args.neighbours)
        # How far the operator has moved from its rigid start (offsets 0): kernel offsets in
        # scope cells, data offsets in input pixels of the layer.
        stats['mean_abs_unit'] = float(np.abs(units).mean())
        results.append(dict(name=name, layer=layer_name, description=per_image[0][1],
                            embedding=embedding, stats=stats, dims=units.shape[1]))
    with open(osp.join(args.out, 'objects.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(objects[0]))
        writer.writeheader()
        writer.writerows(objects)
    draw(osp.join(args.out, 'tsne.png'), results, objects)
    summary = dict(objects=len(objects), images=len(images), models={
        result['name']: dict(layer=result['layer'], units=result['description'],
                             dims=result['dims'], **result['stats'])
        for result in results})
    with open(osp.join(args.out, 'tsne_summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == '__main__':
    main()
