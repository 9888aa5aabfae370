"""Multi-process and multi-machine training and testing: CPU (gloo) runs, resume, test metrics.

A stock mmdet ``tools/train.py --launcher pytorch`` cannot run without CUDA on mmengine
0.10.7: its launcher calls ``torch.cuda.set_device`` (absent from CPU builds of torch), and
the Runner wraps the model in DDP with ``device_ids=[LOCAL_RANK]``, which DDP rejects for a
module on the CPU. Without CUDA, :func:`setup_cpu_distributed` initialises the gloo process
group itself from torchrun's environment (the Runner then skips its own ``init_dist``),
asks for DDP without device ids, and has the evaluation results gathered through the process
group rather than through a shared directory, so that processes on several machines need no
shared disk. With CUDA it does nothing: NCCL, one GPU per process, as in mmdet.

The other helpers serve every distributed run, CPU or GPU: an automatic ``--resume`` resumes
every process from rank 0's checkpoint (or, with none yet, starts from the config's
``load_from``), only the main process writes the test metrics, and
:func:`end_distributed_run` ends a finished run without the gloo abort at exit.
"""
import datetime
import logging
import os
import sys
import types

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.dist import broadcast_object_list, is_main_process
from mmengine.hooks import LoggerHook
from mmengine.runner import find_latest_checkpoint

TORCHRUN_VARIABLES = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def setup_cpu_distributed(cfg: Config, launcher: str) -> None:
    """Prepare ``cfg`` and the gloo process group for a CPU run with ``launcher``."""
    if launcher == 'none' or torch.cuda.is_available():
        return
    if launcher != 'pytorch':
        raise ValueError(f'--launcher {launcher} needs CUDA; on CPU, start the processes with '
                         f'torchrun (tools/dist_train.sh, tools/dist_test.sh) and --launcher '
                         f'pytorch')
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(f'--launcher pytorch needs the environment set by torchrun; '
                           f'{missing} are not set (use tools/dist_train.sh CONFIG NPROC)')

    dist_cfg = cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})
    dist_cfg['backend'] = 'gloo'
    if not dist.is_initialized():
        timeout = dist_cfg.get('timeout')
        dist.init_process_group(
            backend='gloo',
            timeout=None if timeout is None else datetime.timedelta(seconds=timeout))

    wrapper_cfg = dict(type='MMDistributedDataParallel', broadcast_buffers=False,
                       find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper_cfg.update(cfg.get('model_wrapper_cfg') or {})
    # DDP places a CPU module's replica itself; device ids are for one-GPU-per-process only.
    wrapper_cfg['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper_cfg

    # By default mmengine's metrics gather the processes' results through files in
    # .dist_test/ under the working directory, which processes on machines that share no disk
    # do not see (rank 1 fails with FileNotFoundError). 'gpu' is mmengine's name for gathering
    # them through the process group (gloo here); a metric given a collect_dir keeps the files.
    for evaluator in ('val_evaluator', 'test_evaluator'):
        for metric in _metric_configs(cfg.get(evaluator)):
            if metric.get('collect_dir') is None:
                metric.setdefault('collect_device', 'gpu')


def _metric_configs(evaluator) -> list:
    """The metric configs of an evaluator config, in any form mmengine's Runner takes: one
    metric, a list of metrics, or an ``Evaluator`` with ``metrics``."""
    if not evaluator:
        return []
    if isinstance(evaluator, dict):
        evaluator = evaluator.get('metrics', evaluator)
    return list(evaluator) if isinstance(evaluator, (list, tuple)) else [evaluator]


def resume_or_start_from(runner, start_from=None) -> None:
    """``--resume`` without a path: resume from the latest checkpoint of rank 0's work dir, or,
    where there is none, start as the config says, from ``start_from`` (its ``load_from``).

    mmdet's ``tools/train.py`` sets ``load_from = None`` for an automatic resume, so a
    fine-tuning run started with ``--resume`` would silently train from scratch; and with
    ``load_from`` kept, mmengine would *resume* from it (its iteration and optimizer state)
    instead of loading its weights.
    mmengine's automatic resume also reads ``last_checkpoint`` in each process's own work dir,
    but only rank 0 saves checkpoints: on machines that do not share the work dir, the other
    processes would find none, start from iteration 0 with their own weights, and the job would
    fail once rank 0 finished. So every process resumes from rank 0's checkpoint, which must be
    at the same path on every machine (or fails to load there).
    """
    if runner.distributed:
        latest = [find_latest_checkpoint(runner.work_dir) if is_main_process() else None]
        broadcast_object_list(latest)
        latest = latest[0]
    else:
        latest = find_latest_checkpoint(runner.work_dir)
    # What Runner.load_or_resume reads; mmengine has no public setter for them.
    if latest is None:
        runner._resume = False
        runner._load_from = start_from
    else:
        runner._resume = True
        runner._load_from = latest


def end_distributed_run() -> None:
    """End a finished run's process group; call it last.

    mmengine never does. A gloo process whose group is torn down by C++ destructors, at
    ``destroy_process_group`` or at the interpreter's exit, can abort there ("terminate called
    without an active exception", SIGABRT; pytorch/pytorch#190489) when another process, the
    one hosting the rendezvous store among them, has already gone, as two-node CPU tests
    show, also after an explicit ``destroy_process_group``. So on gloo every process waits for the
    others at a barrier, flushes its logs and leaves without running destructors. NCCL groups
    are destroyed as PyTorch asks.
    """
    if not dist.is_initialized():
        return
    if dist.get_backend() != 'gloo':
        dist.destroy_process_group()
        return
    dist.barrier()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def write_test_metrics_on_main_process(runner) -> None:
    """Let only the main process write the test metrics file ``<timestamp>.json``.

    mmengine 0.10.7's ``LoggerHook.after_test_epoch`` dumps the metrics on every rank into the
    same file, so with several processes (CPU or GPU) the writes race, and a rank whose line is
    shorter can leave the tail of another rank's line behind it: a corrupt file (as a
    2-process gloo test shows). The other ranks keep logging the metrics and skip the file.
    """
    if is_main_process():
        return
    for hook in runner.hooks:
        if isinstance(hook, LoggerHook):
            hook.after_test_epoch = types.MethodType(_log_test_metrics_only, hook)


def _log_test_metrics_only(hook, runner, metrics=None) -> None:
    # LoggerHook.after_test_epoch without its dump.
    _, log_str = runner.log_processor.get_log_after_epoch(
        runner, len(runner.test_dataloader), 'test', with_non_scalar=True)
    runner.logger.info(log_str)
