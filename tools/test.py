"""Test (and evaluate) a checkpoint: mmdet's ``tools/test.py`` command line, with DK layers.

Additions to mmdet's script are those of ``tools/train.py``: multi-process CPU runs (gloo),
loading of this project's checkpoints under torch >= 2.6, ``--cfg-options data_root=DIR``,
and a readable error for a ``dcn`` on a BasicBlock ResNet; and ``--out`` gathers the
predictions from the processes the way the metrics do.
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
from dk_mmdet.distributed import (end_distributed_run, setup_cpu_distributed,  # noqa: E402
                                  write_test_metrics_on_main_process)


def parse_args():
    parser = argparse.ArgumentParser(description='Test (and evaluate) a detector checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the directory to save the evaluation metrics in')
    parser.add_argument('--out', type=str,
                        help='dump the predictions to a pickle file (.pkl) for offline evaluation')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument('--show-dir',
                        help='directory (inside the work dir) where painted images are saved')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value in xxx=yyy format; data_root=DIR moves '
        'every dataset path of the config to DIR')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--tta', action='store_true',
                        help='test-time augmentation with the config\'s tta_model and '
                        'tta_pipeline')
    # torch.distributed.launch passes --local-rank (older versions --local_rank).
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        parser.error(f'--out must be a .pkl or .pickle file, got {args.out}')
    return args


def use_test_time_augmentation(cfg) -> None:
    """Wrap the model in the config's ``tta_model`` and test with its ``tta_pipeline``."""
    missing = [key for key in ('tta_model', 'tta_pipeline') if key not in cfg]
    if missing:
        raise KeyError(f'--tta needs {missing} in the config (see mmdet\'s configs with tta)')
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    cfg.tta_model.module = cfg.model
    cfg.model = cfg.tta_model


def main():
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher

    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    cfg.load_from = args.checkpoint

    if args.show or args.show_dir:
        from mmdet.engine.hooks.utils import trigger_visualization_hook
        cfg = trigger_visualization_hook(cfg, args)

    if args.tta:
        use_test_time_augmentation(cfg)

    setup_cpu_distributed(cfg, args.launcher)

    if 'runner_type' in cfg:
        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    write_test_metrics_on_main_process(runner)

    if args.out is not None:
        from mmdet.evaluation import DumpDetResults
        # Gathered from the processes as the config's metric gathers its results (mmdet's
        # script always used files in .dist_test/, which machines sharing no disk do not see).
        metric = runner.test_evaluator.metrics[0]
        runner.test_evaluator.metrics.append(DumpDetResults(
            out_file_path=args.out, collect_device=metric.collect_device,
            collect_dir=metric.collect_dir))

    runner.test()
    end_distributed_run()


if __name__ == '__main__':
    main()
