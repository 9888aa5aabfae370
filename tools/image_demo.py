"""Draw a detector's predictions on images: boxes, masks and class names, with DK layers.

Runs mmdet's ``DetInferencer`` on an image or on every image of a directory and writes, under
``--out-dir``:

- ``vis/<image file name>``: the image with the predictions scoring at least ``--score-thr``
  drawn (box, mask for Mask R-CNN, ``class: score``);
- ``preds/<image name>.json``: every prediction the model keeps (its ``test_cfg`` score
  threshold): ``labels``, ``scores``, ``bboxes`` (x1, y1, x2, y2 in image pixels) and, for
  Mask R-CNN, ``masks`` as COCO RLE.

Class names come from the checkpoint's ``meta.dataset_meta`` (``tools/train.py`` saves it).
Checkpoints load as in ``tools/test.py``: ``weights_only`` under torch >= 2.6.
"""
import argparse
import importlib.util
import os
import os.path as osp
import sys

if importlib.util.find_spec('dk_mmdet') is None:
    # Run from a checkout without installing: use the repository's package.
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import DictAction  # noqa: E402

from dk_mmdet.config_loading import load_config  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(
        description='Draw a detector\'s predictions on an image or a directory of images')
    parser.add_argument('inputs', help='an image file, or a directory of images')
    parser.add_argument('config', help='config file of the detector')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out-dir', default='outputs',
                        help='where vis/ (drawn images) and preds/ (json) are written')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='draw the predictions scoring at least this')
    parser.add_argument('--device', default=None,
                        help='device to run on, e.g. cpu or cuda:0 (default: cuda if available)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value in xxx=yyy format')
    args = parser.parse_args()
    if not osp.exists(args.inputs):
        parser.error(f'inputs: {args.inputs} does not exist')
    if not osp.isfile(args.checkpoint):
        parser.error(f'checkpoint: {args.checkpoint} is not a file')
    return args


def main():
    args = parse_args()
    # Imported here so that --help and argument errors do not wait for mmdet.
    from mmdet.apis import DetInferencer
    from mmdet.apis.det_inferencer import IMG_EXTENSIONS

    if osp.isdir(args.inputs) and not any(
            name.endswith(IMG_EXTENSIONS) for name in os.listdir(args.inputs)):
        raise FileNotFoundError(
            f'inputs: {args.inputs} holds no image file ({", ".join(IMG_EXTENSIONS)})')
    cfg = load_config(args.config, args.cfg_options)
    inferencer = DetInferencer(model=cfg, weights=args.checkpoint, device=args.device,
                               show_progress=False)
    results = inferencer(args.inputs, out_dir=args.out_dir, pred_score_thr=args.score_thr,
                         no_save_pred=False)
    print(f'{len(results["predictions"])} image(s): drawn in {osp.join(args.out_dir, "vis")}, '
          f'predictions in {osp.join(args.out_dir, "preds")}')


if __name__ == '__main__':
    main()
