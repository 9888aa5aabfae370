"""Training-step time and peak memory of RTMDet-s's CSPNeXt backbone with the 5x5 depthwise
conv of every CSPNeXt block replaced by Deformable Kernels, as ratios to the rigid backbone.

Only torch and dk_ops are imported: the backbone is built here from torch layers, so this runs
on a GPU machine without mmcv, mmdet or torchvision. It is mmdet's CSPNeXt (P5 arch,
deepen_factor 0.33, widen_factor 0.5, expand_ratio 0.5, channel attention, BatchNorm, SiLU:
RTMDet-s's backbone), its modules named as mmdet names them, so that an mmdet CSPNeXt's
state_dict loads into it. The 5x5 depthwise conv of each of its 6 CSPNeXt blocks is, in turn,
rigid (nn.Conv2d), local DK (dk_ops.DeformKernel2d, scope 6, one kernel offset set for all
channels, as configs/dk/rtmdet_s-dk-dw_8xb32-300e_coco.py) or global DK, the DK scopes being
dk_ops.rigid_to_scope of the rigid weights and all offsets starting at zero, so every variant
begins as the rigid network: the table's step-0 loss column checks that. A step is the
backbone's forward on random images, the sum of the mean squares of its three outputs as the
loss, backward and an SGD step; the variants run round-robin with benchmark_op's timing helper,
and the table gives each one's median step time and its peak memory (CUDA only), both also as
ratios to rigid, and judges local DK's GPU target (docs/gpu.md#targets):

    python tools/analysis_tools/benchmark_rtmdet.py --device cuda [--amp bfloat16]
    python tools/analysis_tools/benchmark_rtmdet.py --device cpu --batch 1 --image-size 64 64 \
        --repeats 1                                   # a quick check of the script on a CPU
"""
import argparse
import collections
import copy
import functools
import importlib.util
import os.path as osp
import sys

import torch
from torch import nn

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if importlib.util.find_spec('dk_ops') is None:
    # Run from a checkout without installing: use the repository's package.
    sys.path.insert(0, REPO_ROOT)

import dk_ops  # noqa: E402
from training_step import (Trainee, add_step_arguments, check_step_arguments,  # noqa: E402
                           deform_kernel_from_rigid, finish_report, settings_line,
                           timed_rows)

LABELS = {'rigid': 'rigid', 'dk_local': 'local DK', 'dk_global': 'global DK'}
REPLACEMENTS = {
    'dk_local': functools.partial(deform_kernel_from_rigid, dk_ops.DeformKernel2d),
    'dk_global': functools.partial(deform_kernel_from_rigid, dk_ops.GlobalDeformKernel2d),
}
# The GPU target (docs/gpu.md#targets): step time at most this many times rigid's.
TIME_TARGETS = {'dk_local': 1.2}

# mmdet's CSPNeXt P5 arch: (in channels, out channels, CSPNeXt blocks, identity in the blocks,
# SPP) per stage, before the widen and deepen factors.
P5_ARCH = [(64, 128, 3, True, False), (128, 256, 6, True, False), (256, 512, 6, True, False),
           (512, 1024, 3, False, True)]
RTMDET_S = dict(deepen_factor=0.33, widen_factor=0.5, expand_ratio=0.5)
DEPTHWISE_KERNEL = 5


class ConvModule(nn.Sequential):
    """mmcv's ConvModule with BatchNorm and SiLU: a conv without bias, then BN and SiLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1):
        super().__init__(collections.OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                           groups=groups, bias=False),
            # mmdet's RTMDet BN settings
            bn=nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.03),
            activate=nn.SiLU(inplace=True)))


class DepthwiseSeparableConvModule(nn.Sequential):
    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__(collections.OrderedDict(
            depthwise_conv=ConvModule(in_channels, in_channels, kernel_size, groups=in_channels),
            pointwise_conv=ConvModule(in_channels, out_channels, 1)))


class CSPNeXtBlock(nn.Module):
    """A 3x3 conv, then the 5x5 depthwise conv and the 1x1 pointwise conv, plus the identity."""

    def __init__(self, channels, add_identity):
        super().__init__()
        self.conv1 = ConvModule(channels, channels, 3)
        self.conv2 = DepthwiseSeparableConvModule(channels, channels, DEPTHWISE_KERNEL)
        self.add_identity = add_identity

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class ChannelAttention(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1)
        self.act = nn.Hardsigmoid(inplace=True)

    def forward(self, x):
        return x * self.act(self.fc(self.global_avgpool(x)))


class CSPLayer(nn.Module):
    """Two 1x1 branches, the blocks on one, concatenated, channel attention, a 1x1 conv."""

    def __init__(self, channels, num_blocks, add_identity, expand_ratio):
        super().__init__()
        mid_channels = int(channels * expand_ratio)
        self.main_conv = ConvModule(channels, mid_channels, 1)
        self.short_conv = ConvModule(channels, mid_channels, 1)
        self.final_conv = ConvModule(2 * mid_channels, channels, 1)
        self.blocks = nn.Sequential(*[CSPNeXtBlock(mid_channels, add_identity)
                                      for _ in range(num_blocks)])
        self.attention = ChannelAttention(2 * mid_channels)

    def forward(self, x):
        merged = torch.cat((self.blocks(self.main_conv(x)), self.short_conv(x)), dim=1)
        return self.final_conv(self.attention(merged))


class SPPBottleneck(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_sizes=(5, 9, 13)):
        super().__init__()
        mid_channels = in_channels // 2
        self.conv1 = ConvModule(in_channels, mid_channels, 1)
        self.poolings = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2)
                                      for k in kernel_sizes)
        self.conv2 = ConvModule(mid_channels * (len(kernel_sizes) + 1), out_channels, 1)

    def forward(self, x):
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pooling(x) for pooling in self.poolings], dim=1))


def num_blocks_of(stage_blocks, deepen_factor):
    return max(round(stage_blocks * deepen_factor), 1)


class CSPNeXt(nn.Module):
    """mmdet's CSPNeXt backbone (P5): a stem of three 3x3 convs, then four stages of a strided
    3x3 conv, SPP in the last, and a CSP layer; returns the outputs of stages 2-4.

    The weights keep torch's default init (mmdet's Kaiming uniform with a=sqrt(5) is the same
    draw): what is timed does not depend on them."""

    def __init__(self, deepen_factor, widen_factor, expand_ratio):
        super().__init__()
        stem_channels = int(P5_ARCH[0][0] * widen_factor)
        self.stem = nn.Sequential(ConvModule(3, stem_channels // 2, 3, stride=2),
                                  ConvModule(stem_channels // 2, stem_channels // 2, 3),
                                  ConvModule(stem_channels // 2, stem_channels, 3))
        for index, (in_channels, out_channels, blocks, add_identity, spp) in enumerate(P5_ARCH):
            in_channels = int(in_channels * widen_factor)
            out_channels = int(out_channels * widen_factor)
            stage = [ConvModule(in_channels, out_channels, 3, stride=2)]
            if spp:
                stage.append(SPPBottleneck(out_channels, out_channels))
            stage.append(CSPLayer(out_channels, num_blocks_of(blocks, deepen_factor),
                                  add_identity, expand_ratio))
            self.add_module(f'stage{index + 1}', nn.Sequential(*stage))

    def forward(self, x):
        x = self.stage1(self.stem(x))
        c3 = self.stage2(x)
        c4 = self.stage3(c3)
        return c3, c4, self.stage4(c4)


def depthwise_modules(model: nn.Module):
    """The ConvModule holding the 5x5 depthwise conv of every CSPNeXt block, in order."""
    return [block.conv2.depthwise_conv for block in model.modules()
            if isinstance(block, CSPNeXtBlock)]


def build_variants(variants, seed=0):
    """{variant: backbone}: the same rigid RTMDet-s backbone (same weights), its depthwise
    convs replaced."""
    torch.manual_seed(seed)
    rigid = CSPNeXt(**RTMDET_S)
    models = {}
    for variant in variants:
        model = copy.deepcopy(rigid)
        if variant != 'rigid':
            for module in depthwise_modules(model):
                module.conv = REPLACEMENTS[variant](module.conv)
        models[variant] = model.train()
    return models


def training_loss(model, images):
    return sum(level.float().square().mean() for level in model(images))


def judge(row, device):
    if row['variant'] not in TIME_TARGETS:
        return ''
    if device.type != 'cuda':
        return 'not judged on a CPU'
    if row['time_ratio'] > TIME_TARGETS[row['variant']]:
        return f'no: time {row["time_ratio"]:.2f}x'
    return 'yes'


def benchmark(args, device, amp_dtype):
    """One row (a dict) per variant, in the order of args.variants."""
    models = build_variants(args.variants, args.seed)
    images = torch.rand(args.batch, 3, *args.image_size,
                        generator=torch.Generator().manual_seed(args.seed)).to(device)
    trainees = [Trainee(model.to(device), training_loss, images, device, amp_dtype, args.seed)
                for model in models.values()]
    # what ran: {class name: count} of the depthwise convs of the CSPNeXt blocks
    rows = timed_rows(trainees, args.variants, lambda model: dict(collections.Counter(
        type(module.conv).__name__ for module in depthwise_modules(model))), device,
        args.repeats)
    for row in rows:
        row['target_met'] = judge(row, device)
    return rows


def markdown_row(row):
    memory = (f'{row["peak_mib"]:.0f} | {row["memory_ratio"]:.2f}'
              if row['peak_mib'] is not None else 'not measured | -')
    layers = ', '.join(f'{count} {name}' for name, count in row['layers'].items())
    target = (f'time <= {TIME_TARGETS[row["variant"]]:.2f}x'
              if row['variant'] in TIME_TARGETS else '')
    return (f'| {LABELS[row["variant"]]} | {layers} | {row["step_ms"]:.1f} | '
            f'{row["time_ratio"]:.2f} | {memory} | '
            f'{row["first_loss"]:.6f} ({row["first_loss_gap"]:.1e}) | {target} | '
            f'{row["target_met"]} |')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_step_arguments(parser, LABELS, batch=8, image_size=(640, 640))
    args = parser.parse_args(argv)
    check_step_arguments(parser, args, last_stage='stage 4')
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    amp_dtype = getattr(torch, args.amp) if args.amp else None
    print(settings_line(args, device))
    print('| RTMDet-s backbone, 5x5 depthwise convs | layers | step ms | x rigid | peak MiB '
          '| x rigid | step-0 loss (gap to rigid) | GPU target | met |')
    print('|---|---|---|---|---|---|---|---|---|')
    rows = benchmark(args, device, amp_dtype)
    for row in rows:
        print(markdown_row(row), flush=True)
    finish_report(rows, args, device)
    return rows


if __name__ == '__main__':
    main()
