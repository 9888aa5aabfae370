"""Forward+backward time of dk_ops.deform_kernel_conv2d against F.conv2d (and mmcv's and
torchvision's DCN where installed).

For the 3x3 convs of the ResNet-50 stages (batch N, C in = C out, stride 1, padding 1),
prints the median time of forward+backward (gradients of every input), its ratio to F.conv2d
and whether that meets its GPU target (docs/gpu.md#targets), and on CUDA the step's workspace: its peak
memory beyond the inputs, the output and the gradients it leaves. The cases of a shape are
timed in interleaved rounds, so load from other processes on a shared machine hits them alike
and the ratios stay fair:

    python tools/analysis_tools/benchmark_op.py [--batch 2] [--repeats 5] [--device cpu]
                                                [--stages c3 c4 c5]
    python tools/analysis_tools/benchmark_op.py --device cuda --dtype float16 --batch 8
    python tools/analysis_tools/benchmark_op.py --shrink 8 --repeats 1   # a quick check on a CPU
    python tools/analysis_tools/benchmark_op.py --cases 'DK global, scope 4' --batch 8
    python tools/analysis_tools/benchmark_op.py --depthwise [--device cuda]

--cases times only the named cases (and F.conv2d, the baseline of every ratio).
--column-mib 64 256 adds local DK scope 4 with those column buffers (DK_OPS_MAX_COLUMN_BYTES) to
the cases: the op's default on a GPU is ceil(S / taps) chunks of the batch, untimed against others.
On a CPU it also times global DK with its convolutions forced to either formulation
(DK_OPS_GLOBAL_CONVOLUTION=grouped or per_image, docs/operator.md), in the rows so marked.
On CUDA it also times the opt-in implicit GEMMs of local DK (DK_OPS_LOCAL_KERNELS=implicit_gemm,
docs/gpu.md) in the rows marked "implicit GEMM": the forward and the weight gradient without the
scope columns, the other gradients as in the rows above them; and, where Triton is installed,
the fused path (DK_OPS_CUDA_PATH=fused) in the rows marked "fused", with a line per case at the
end: fused / columns, and which one wins.
--depthwise times depthwise convs (groups = C) instead, against the depthwise F.conv2d: the
shapes of docs/speed.md's depthwise section (DEPTHWISE_SHAPES), with one kernel offset set for
all channels and one per channel, and the first also on the scope columns
(DK_OPS_LOCAL_KERNELS=columns), the path the op takes for grouped convs.
"""
import argparse
import contextlib
import importlib.util
import os
import statistics
import time

import torch
import torch.nn.functional as F

import dk_ops

# (channels, spatial size) of the ResNet-50 stages at 800 px
STAGES = {'c3': (128, 100), 'c4': (256, 50), 'c5': (512, 25)}
# Depthwise convs (channels, spatial size, kernel, scope): the four, then the 5x5
# depthwise convs of RTMDet-tiny's CSPNeXt blocks at a 640 px input (their channels are half the
# stage's: 48/96/192/384).
DEPTHWISE_SHAPES = [(96, 56, 3, 4), (256, 28, 3, 4), (128, 32, 5, 6), (256, 16, 7, 8),
                    (24, 160, 5, 6), (48, 80, 5, 6), (96, 40, 5, 6), (192, 20, 5, 6)]
# The GPU targets (docs/gpu.md#targets): forward+backward time at most this many times F.conv2d's; and a
# workspace no larger than torchvision's deform_conv2d's.
TIME_TARGETS = {'DK local, scope 3': 1.5, 'DK local, scope 4': 2.0, 'DK global, scope 4': 1.3,
                'DK+DCN, scope 4': 2.5}


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def median_times(steps, device, repeats):
    """Median seconds of each step, timed round-robin (one call of each step per round)."""
    times = [[] for _ in steps]
    for round_ in range(repeats + 1):  # round 0 warms up (allocator, oneDNN / cuDNN plans)
        for step, samples in zip(steps, times):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if round_:
                samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def leaf(tensor):
    return tensor.detach().requires_grad_()


@contextlib.contextmanager
def environment(variables):
    """``os.environ`` with ``variables`` set, restored afterwards."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


class ForwardBackward:
    """One forward+backward of ``fn`` on ``inputs``, which it leaves their gradients, with the
    environment variables ``env`` set (dk_ops reads its settings on every call)."""

    def __init__(self, fn, *inputs, env=None):
        self.fn, self.inputs, self.env = fn, inputs, env or {}

    def __call__(self):
        for t in self.inputs:
            t.grad = None
        with environment(self.env):
            output = self.fn(*self.inputs)
            output.sum().backward()
        return output

    def workspace_bytes(self, device):
        """CUDA memory a step needs beyond its inputs, its output and their gradients."""
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
        output = self()
        torch.cuda.synchronize(device)
        held = output.numel() * output.element_size() + sum(
            t.grad.numel() * t.grad.element_size() for t in self.inputs)
        return torch.cuda.max_memory_allocated(device) - resident - held


def cases(channels, size, batch, device, dtype, column_mib=()):
    """(name, step) pairs; every tensor that a layer would learn or receive requires grad."""
    make = dict(device=device, dtype=dtype)
    x = leaf(torch.randn(batch, channels, size, size, **make))
    rigid = leaf(torch.randn(channels, channels, 3, 3, **make) * 0.01)
    offsets = lambda scale: leaf(scale * torch.randn(batch, 18, size, size, **make))  # noqa: E731

    def dk(scope, kernel_offset, env=None, **kw):
        weight = leaf(torch.randn(channels, channels, scope, scope, **make) * 0.01)
        return ForwardBackward(
            lambda x, w, ko, *extra: dk_ops.deform_kernel_conv2d(
                x, w, ko, kernel_size=3, padding=1, **dict(zip(kw, extra))), x, weight,
            kernel_offset, *kw.values(), env=env)

    yield 'F.conv2d', ForwardBackward(lambda x, w: F.conv2d(x, w, padding=1), x, rigid)
    yield 'DK local, scope 3', dk(3, offsets(0.3))
    yield 'DK local, scope 4', dk(4, offsets(0.3))
    for mib in column_mib:
        yield (f'DK local, scope 4, {mib} MiB columns',
               dk(4, offsets(0.3), env={'DK_OPS_MAX_COLUMN_BYTES': str(mib << 20)}))
    global_offsets = leaf(0.3 * torch.randn(batch, 18, **make))
    yield 'DK global, scope 4', dk(4, global_offsets)
    yield 'DK+DCN, scope 4', dk(4, offsets(0.3), data_offset=offsets(1.0))
    if device.type == 'cpu':  # the CPU's two formulations of global DK, whatever the rule
        for formulation in ('grouped', 'per_image'):
            yield (f'DK global, scope 4, {formulation}',
                   dk(4, global_offsets, env={'DK_OPS_GLOBAL_CONVOLUTION': formulation}))
    if device.type == 'cuda':  # the CPU kernels have no implicit GEMM
        implicit_gemm = {'DK_OPS_LOCAL_KERNELS': 'implicit_gemm'}
        yield 'DK local, scope 4, implicit GEMM', dk(4, offsets(0.3), env=implicit_gemm)
        yield 'DK+DCN, scope 4, implicit GEMM', dk(4, offsets(0.3), env=implicit_gemm,
                                                  data_offset=offsets(1.0))
        if importlib.util.find_spec('triton') is not None:  # the fused path (DK_OPS_CUDA_PATH)
            fused = {'DK_OPS_CUDA_PATH': 'fused'}
            yield 'DK local, scope 3, fused', dk(3, offsets(0.3), env=fused)
            yield 'DK local, scope 4, fused', dk(4, offsets(0.3), env=fused)
            yield 'DK+DCN, scope 4, fused', dk(4, offsets(0.3), env=fused,
                                               data_offset=offsets(1.0))
    yield from dcn_baselines(x, rigid, offsets(1.0), device, dtype)


def depthwise_cases(channels, size, kernel, scope, batch, device, dtype):
    """(name, step) pairs of a depthwise conv, F.conv2d's first."""
    make = dict(device=device, dtype=dtype)
    x = leaf(torch.randn(batch, channels, size, size, **make))
    padding = kernel // 2

    def dk(kernel_offset_groups, env=None):
        weight = leaf(torch.randn(channels, 1, scope, scope, **make) * 0.1)
        offset = leaf(0.3 * torch.randn(batch, 2 * kernel_offset_groups * kernel * kernel, size,
                                        size, **make))
        return ForwardBackward(
            lambda x, w, ko: dk_ops.deform_kernel_conv2d(
                x, w, ko, kernel_size=kernel, padding=padding, groups=channels,
                kernel_offset_groups=kernel_offset_groups), x, weight, offset, env=env)

    rigid = leaf(torch.randn(channels, 1, kernel, kernel, **make) * 0.1)
    yield 'F.conv2d', ForwardBackward(
        lambda x, w: F.conv2d(x, w, padding=padding, groups=channels), x, rigid)
    yield 'DK, one offset set', dk(1)
    yield 'DK, one offset set per channel', dk(channels)
    yield 'DK, one offset set, scope columns', dk(1, env={'DK_OPS_LOCAL_KERNELS': 'columns'})


def dcn_baselines(x, weight, data_offset, device, dtype):
    """DCN of other libraries on the same input: what DK+DCN costs beside plain DCN."""
    try:
        from torchvision.ops import deform_conv2d as torchvision_deform_conv2d
    except ImportError:
        torchvision_deform_conv2d = None
    if torchvision_deform_conv2d is not None and dtype != torch.bfloat16:  # it has no bf16
        yield 'torchvision DCN', ForwardBackward(
            lambda x, w, off: torchvision_deform_conv2d(x, off, w, padding=1), x, weight,
            data_offset)
    try:
        from mmcv.ops import deform_conv2d, get_compiling_cuda_version
    except ImportError:
        return
    if device.type == 'cpu' and dtype != torch.float32:
        return
    if device.type == 'cuda' and get_compiling_cuda_version() == 'not available':
        return  # this mmcv was built without its CUDA ops
    yield 'mmcv DCN', ForwardBackward(
        lambda x, w, off: deform_conv2d(x, off, w, 1, 1, 1, 1, 1, False, x.shape[0]), x, weight,
        data_offset)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'])
    parser.add_argument('--stages', nargs='+', default=list(STAGES), choices=list(STAGES))
    parser.add_argument('--tf32', action='store_true',
                        help='let torch.matmul\'s float32 GEMMs (torchvision\'s DCN) use TF32 '
                        'too; the op\'s follow cuDNN\'s switch, as convolutions do')
    parser.add_argument('--column-mib', type=int, nargs='*', default=[],
                        help='also time local DK scope 4 with column buffers of these sizes')
    parser.add_argument('--cases', nargs='+', metavar='NAME',
                        help='time only these cases besides F.conv2d, e.g. "DK global, scope 4"')
    parser.add_argument('--depthwise', action='store_true',
                        help='time depthwise convs (DEPTHWISE_SHAPES) instead of the stages')
    parser.add_argument('--shrink', type=int, default=1,
                        help='divide the channels and the size of each stage by this')
    args = parser.parse_args()
    if args.shrink < 1:
        parser.error(f'--shrink {args.shrink} must be at least 1')
    shapes = ([(channels // args.shrink, size // args.shrink, kernel, scope)
               for channels, size, kernel, scope in DEPTHWISE_SHAPES] if args.depthwise else
              [(channels // args.shrink, size // args.shrink, 3, None)
               for channels, size in (STAGES[stage] for stage in args.stages)])
    if min(min(shape[:2]) for shape in shapes) < 1:
        parser.error(f'--shrink {args.shrink} leaves a stage of {args.stages} without channels '
                     f'or pixels: (channels, size) {shapes}')
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32 or torch.backends.cuda.matmul.allow_tf32
    where = (f'{torch.cuda.get_device_name(device)}, TF32 in cuDNN convs and dk_ops GEMMs '
             f'(cudnn.allow_tf32) {torch.backends.cudnn.allow_tf32}, in other GEMMs '
             f'(cuda.matmul.allow_tf32) {torch.backends.cuda.matmul.allow_tf32}'
             if device.type == 'cuda' else f'threads={torch.get_num_threads()}')
    print(f'device={device} ({where}) dtype={args.dtype} batch={args.batch}'
          f' torch={torch.__version__}')
    winners = []
    print('| shape (N, C, H, W) | op | fwd+bwd ms | x F.conv2d | workspace MiB | targets |')
    print('|---|---|---|---|---|---|')
    for channels, size, kernel, scope in shapes:
        if args.depthwise:
            named_steps = list(depthwise_cases(channels, size, kernel, scope, args.batch, device,
                                               dtype))
            label = f'({args.batch}, {channels}, {size}, {size}) k{kernel} scope {scope}'
        else:
            named_steps = list(cases(channels, size, args.batch, device, dtype, args.column_mib))
            label = f'({args.batch}, {channels}, {size}, {size})'

        if args.cases:
            unknown = set(args.cases) - {name for name, _ in named_steps}
            if unknown:
                parser.error(f'--cases {sorted(unknown)}: no such case; the cases are '
                             f'{[name for name, _ in named_steps]}')
            named_steps = [(name, step) for name, step in named_steps
                           if name == 'F.conv2d' or name in args.cases]
        names, steps = zip(*named_steps)
        seconds = median_times(steps, device, args.repeats)
        workspaces = dict(zip(names, (step.workspace_bytes(device) / 2**20 for step in steps))
                          if device.type == 'cuda' else {})
        for name, time_ in zip(names, seconds):
            ratio = time_ / seconds[0]
            print(f'| {label} | {name} | '
                  f'{time_ * 1e3:.1f} | {ratio:.2f} | '
                  f'{f"{workspaces[name]:.1f}" if workspaces else "-"} | '
                  f'{targets(name, ratio, workspaces)} |', flush=True)
        winners.extend(fused_against_columns(label, dict(zip(names, seconds))))
    for line in winners:
        print(line)
    if device.type != 'cuda':
        print('The workspace is measured on CUDA only (torch.cuda.max_memory_allocated), and the '
              'targets are judged there.')


def fused_against_columns(label, seconds):
    """A line per case timed both ways: the fused path's time over the compiled op's (the
    columns path, the default), and which one wins."""
    lines = []
    for name, fused in seconds.items():
        if name.endswith(', fused') and name[:-len(', fused')] in seconds:
            columns = seconds[name[:-len(', fused')]]
            winner = 'fused' if fused < columns else 'columns'
            lines.append(f'{label} {name[:-len(", fused")]}: fused / columns = '
                         f'{fused / columns:.2f}, {winner} wins')
    return lines


def targets(name, ratio, workspaces):
    """The verdicts against the GPU targets for one row on CUDA (``workspaces`` empty elsewhere). A variant of a
    case ("DK local, scope 4, 64 MiB columns") is held to the case's target."""
    target = TIME_TARGETS.get(', '.join(name.split(', ')[:2]))
    if target is None or not workspaces:
        return ''
    verdicts = [f'time <= {target:.1f}x: {"met" if ratio <= target else "missed"}']
    if 'torchvision DCN' in workspaces:
        met = workspaces[name] <= workspaces['torchvision DCN']
        verdicts.append(f'workspace <= torchvision DCN\'s: {"met" if met else "missed"}')
    return '; '.join(verdicts)


if __name__ == '__main__':
    main()
