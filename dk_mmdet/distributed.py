"""Multi-process training and testing on CPU (gloo) through the ``pytorch`` launcher.

A stock mmdet ``tools/train.py --launcher pytorch`` cannot run without CUDA on mmengine
0.10.7: its launcher calls ``torch.cuda.set_device`` (absent from CPU builds of torch), and
the Runner wraps the model in DDP with ``device_ids=[LOCAL_RANK]``, which DDP rejects for a
module on the CPU. Without CUDA, :func:`setup_cpu_distributed` initialises the gloo process
group itself from torchrun's environment (the Runner then skips its own ``init_dist``) and
asks for DDP without device ids. With CUDA it does nothing: NCCL, one GPU per process, as in
mmdet.
"""
import datetime
import os
import types

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.dist import is_main_process
from mmengine.hooks import LoggerHook

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


def write_test_metrics_on_main_process(runner) -> None:
    """Let only the main process write the test metrics file ``<timestamp>.json``.

    mmengine 0.10.7's ``LoggerHook.after_test_epoch`` dumps the metrics on every rank into the
    same file, so with several processes (CPU or GPU) the writes race, and a rank whose line is
    shorter can leave the tail of another rank's line behind it: a corrupt file (seen in a
    2-process gloo test). The other ranks keep logging the metrics and skip the file.
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
