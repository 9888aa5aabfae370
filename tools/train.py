"""Train a detector: mmdet's ``tools/train.py`` command line, with the DK layers available.

Additions to mmdet's script: multi-process CPU runs (gloo) under ``--launcher pytorch``,
``--resume`` without a path resuming every process from the checkpoint rank 0 finds (not each
from its own work dir) and, where there is none yet, starting from the config's ``load_from``
(mmdet's script drops it), loading of this project's checkpoints under torch >= 2.6,
``--cfg-options data_root=DIR`` that moves every dataset path, and a readable error for a
``dcn`` on a BasicBlock ResNet.
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
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from dk_mmdet.config_loading import load_config  # noqa: E402
from dk_mmdet.distributed import (end_distributed_run,  # noqa: E402
                                  resume_or_start_from, setup_cpu_distributed)


def parse_args():
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true', default=False,
                        help='enable automatic-mixed-precision training (CUDA only)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate with the total batch size')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from the given checkpoint, or without a path from the latest checkpoint '
        'in the work dir')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value in xxx=yyy format; data_root=DIR moves '
        'every dataset path of the config to DIR')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (older versions --local_rank).
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main():
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher

    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'

    if args.auto_scale_lr:
        if cfg.get('auto_scale_lr', {}).get('base_batch_size') is None:
            raise RuntimeError('--auto-scale-lr needs auto_scale_lr=dict(enable=..., '
                               'base_batch_size=...) in the config')
        cfg.auto_scale_lr.enable = True

    start_from = cfg.get('load_from')  # the weights to start from when nothing is resumed
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    setup_cpu_distributed(cfg, args.launcher)

    if 'runner_type' in cfg:
        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    if args.resume == 'auto':
        resume_or_start_from(runner, start_from)
    runner.train()
    end_distributed_run()


if __name__ == '__main__':
    main()
