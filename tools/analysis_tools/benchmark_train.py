"""Training-iteration time of Faster R-CNN R50-FPN per conv type, as ratios to the rigid model.

One full iteration (data preprocessing, forward, loss, backward, SGD step) on a fixed
synthetic batch, for each config of ``configs/dk`` that differs only in the conv of stages
c3-c5. The variants run round-robin (one iteration each per round), so a change in the load
of the machine affects them alike; the report gives each variant's median time and its ratio
to the rigid model's median.

    python tools/analysis_tools/benchmark_train.py --batch-size 2 --image-size 512
"""
import argparse
import importlib.util
import os.path as osp
import statistics
import sys
import time

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if importlib.util.find_spec('dk_mmdet') is None:
    # Run from a checkout without installing: use the repository's package.
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
from mmdet.testing import demo_mm_inputs  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402

CONFIG_DIR = osp.join(REPO_ROOT, 'configs', 'dk')
# variant name -> Faster R-CNN R50-FPN 1x config
VARIANTS = {
    'rigid': 'faster-rcnn_r50_fpn_1x_coco.py',
    'dcn': 'faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py',
    'dk': 'faster-rcnn_r50-dk-c3-c5_fpn_1x_coco.py',
    'dk-global': 'faster-rcnn_r50-dk-global-c3-c5_fpn_1x_coco.py',
    'dk-dcn': 'faster-rcnn_r50-dk-dconv-c3-c5_fpn_1x_coco.py',
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--image-size', type=int, default=512)
    parser.add_argument('--warmup', type=int, default=2, help='untimed rounds first')
    parser.add_argument('--iters', type=int, default=5, help='timed rounds')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch threads (default: torch\'s own choice)')
    return parser.parse_args()


def build_trainable(config_file: str):
    """The detector of ``config_file`` (no pretrained weights) and its optimizer wrapper."""
    cfg = Config.fromfile(osp.join(CONFIG_DIR, config_file))
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    return model, build_optim_wrapper(model, cfg.optim_wrapper)


def main():
    args = parse_args()
    if 'rigid' not in args.variants:
        raise ValueError('--variants must include rigid, the reference of the ratios')
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    init_default_scope('mmdet')
    torch.manual_seed(0)
    trainables = {name: build_trainable(VARIANTS[name]) for name in args.variants}
    # demo_mm_inputs draws its boxes from a fixed seed: every variant sees the same batch.
    batch = demo_mm_inputs(batch_size=args.batch_size,
                           image_shapes=(3, args.image_size, args.image_size), num_items=[5] *
                           args.batch_size, num_classes=80)

    times = {name: [] for name in args.variants}
    for round_index in range(args.warmup + args.iters):
        for name, (model, optim_wrapper) in trainables.items():
            start = time.perf_counter()
            model.train_step(batch, optim_wrapper)
            elapsed = time.perf_counter() - start
            if round_index >= args.warmup:
                times[name].append(elapsed)

    medians = {name: statistics.median(samples) for name, samples in times.items()}
    print(f'Faster R-CNN R50-FPN training iteration, batch {args.batch_size} at '
          f'{args.image_size}x{args.image_size}, {torch.get_num_threads()} threads, median of '
          f'{args.iters} after {args.warmup} warm-up rounds')
    print(f'| {"conv in c3-c5":<14} | {"median (s)":>10} | {"vs rigid":>8} |')
    print(f'|{"-" * 16}|{"-" * 12}|{"-" * 10}|')
    for name, median in medians.items():
        print(f'| {name:<14} | {median:>10.2f} | {median / medians["rigid"]:>7.2f}x |')


if __name__ == '__main__':
    main()
