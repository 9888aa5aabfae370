"""Training-step time and peak memory of torchvision's ResNet-50 and Faster R-CNN R50-FPN with
the conv2 of layer2-4 replaced, as ratios to the rigid network.

No mmcv or mmdet is needed: the networks are torchvision's and the layers dk_ops' own, so this
runs on a GPU machine that has only a CUDA build of torch and torchvision. The 3x3 conv2 of
every Bottleneck of layer2-4 (the stages c3-c5 of the configs) becomes local DK, global DK,
DK + DCN (scope 4, as in configs/dk) or torchvision's DCN, each started from the rigid conv's
weight (dk_ops.rigid_to_scope for DK, zero offsets for all), so every variant begins as the
rigid network: the table's step-0 loss column checks that. A step is forward, loss, backward
and an SGD step; the variants run round-robin with benchmark_op's timing helper (load from
other processes hits them alike), and the table gives each one's median step time and its
peak memory (CUDA only), both also as ratios to rigid, and judges the GPU targets:

    python tools/analysis_tools/benchmark_backbone.py --device cuda [--amp bfloat16]
    python tools/analysis_tools/benchmark_backbone.py --device cpu --batch 1 --image-size 64 64 \
        --repeats 1                                   # a quick check of the script on a CPU

--amp runs the step under torch.autocast (float16 with a gradient scaler). On a CPU
torchvision's deform_conv2d has no autocast kernel, so there all but torchvision_dcn can run it.
"""
import argparse
import collections
import copy
import functools
import importlib.util
import os.path as osp
import sys

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import deform_conv2d

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if importlib.util.find_spec('dk_ops') is None:
    # Run from a checkout without installing: use the repository's package.
    sys.path.insert(0, REPO_ROOT)

import dk_ops  # noqa: E402
from training_step import (Trainee, add_step_arguments, check_step_arguments,  # noqa: E402
                           deform_kernel_from_rigid, finish_report, settings_line,
                           timed_rows)

LABELS = {
    'rigid': 'rigid',
    'dk_local': 'local DK',
    'dk_global': 'global DK',
    'dk_dcn': 'DK + DCN',
    'torchvision_dcn': 'torchvision DCN',
}
# The GPU targets (docs/gpu.md#targets): step time at most this many times rigid's; every DK variant also
# peak memory at most MEMORY_TARGET times rigid's and a shorter step than torchvision's DCN.
TIME_TARGETS = {'dk_local': 1.15, 'dk_global': 1.05, 'dk_dcn': 1.25}
MEMORY_TARGET = 1.10
# The op that each deformable variant calls, to check its autocast support before --amp.
OPS = {'dk_local': 'dk_ops::deform_kernel_conv2d', 'dk_global': 'dk_ops::deform_kernel_conv2d',
       'dk_dcn': 'dk_ops::deform_kernel_conv2d', 'torchvision_dcn': 'torchvision::deform_conv2d'}
NUM_CLASSES = {'resnet50': 1000, 'faster_rcnn': 91}  # ImageNet; COCO's 80 in torchvision's ids


class TorchvisionDCN(nn.Module):
    """DCN (v1) through ``torchvision.ops.deform_conv2d``: the weight of ``rigid``, and an
    offset conv of its geometry that starts at zero, so the layer starts as ``rigid``."""

    def __init__(self, rigid: nn.Conv2d):
        super().__init__()
        self.weight = nn.Parameter(rigid.weight.detach().clone())
        self.stride, self.padding, self.dilation = rigid.stride, rigid.padding, rigid.dilation
        taps = rigid.kernel_size[0] * rigid.kernel_size[1]
        self.offset_conv = nn.Conv2d(rigid.in_channels, 2 * taps, rigid.kernel_size, rigid.stride,
                                     rigid.padding, rigid.dilation)
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def forward(self, x):
        return deform_conv2d(x, self.offset_conv(x), self.weight, stride=self.stride,
                             padding=self.padding, dilation=self.dilation)


REPLACEMENTS = {
    'dk_local': functools.partial(deform_kernel_from_rigid, dk_ops.DeformKernel2d),
    'dk_global': functools.partial(deform_kernel_from_rigid, dk_ops.GlobalDeformKernel2d),
    'dk_dcn': functools.partial(deform_kernel_from_rigid, dk_ops.DeformKernelConv2d),
    'torchvision_dcn': TorchvisionDCN,
}


def build_resnet50(image_size):
    # any image size: the classifier pools globally
    return torchvision.models.resnet50(num_classes=NUM_CLASSES['resnet50'])


def build_faster_rcnn(image_size):
    # BatchNorm in training mode (there are no pretrained statistics to freeze); the stem and
    # layer1 frozen, as in mmdet's R50 configs.
    backbone = resnet_fpn_backbone(backbone_name='resnet50', weights=None,
                                   norm_layer=nn.BatchNorm2d, trainable_layers=3)
    # min_size and max_size equal to the images' sides: the transform keeps their size.
    return FasterRCNN(backbone, num_classes=NUM_CLASSES['faster_rcnn'],
                      min_size=min(image_size), max_size=max(image_size))


MODELS = {'resnet50': build_resnet50, 'faster_rcnn': build_faster_rcnn}


def resnet_of(model: nn.Module) -> nn.Module:
    """The module holding layer2-4: the ResNet itself, or a detector's backbone body."""
    return model.backbone.body if isinstance(model, FasterRCNN) else model


def replaced_convs(model: nn.Module):
    """(Bottleneck, its conv2) for every block of layer2-4."""
    resnet = resnet_of(model)
    return [(block, block.conv2) for stage in (resnet.layer2, resnet.layer3, resnet.layer4)
            for block in stage]


def build_variants(model_name, variants, image_size, seed=0):
    """{variant: model}: the same rigid network (same weights), its conv2s replaced."""
    torch.manual_seed(seed)
    rigid = MODELS[model_name](image_size)
    models = {}
    for variant in variants:
        model = copy.deepcopy(rigid)
        if variant != 'rigid':
            for block, conv in replaced_convs(model):
                block.conv2 = REPLACEMENTS[variant](conv)
        models[variant] = model.train()
    return models


def make_inputs(model_name, batch, image_size, device, seed=0):
    """Random images and targets (the same for every variant): class labels for the ResNet,
    a few boxes per image for the detector."""
    generator = torch.Generator().manual_seed(seed)
    height, width = image_size
    images = torch.rand(batch, 3, height, width, generator=generator)
    num_classes = NUM_CLASSES[model_name]
    if model_name == 'resnet50':
        return images.to(device), torch.randint(num_classes, (batch, ), generator=generator).to(
            device)
    targets = []
    for _ in range(batch):
        corner = torch.rand(4, 2, generator=generator) * 0.6
        side = 0.1 + torch.rand(4, 2, generator=generator) * 0.3
        boxes = torch.cat([corner, corner + side], 1) * torch.tensor([width, height] * 2)
        labels = torch.randint(1, num_classes, (4, ), generator=generator)
        targets.append({'boxes': boxes.to(device), 'labels': labels.to(device)})
    return list(images.to(device)), targets


def training_loss(model, inputs):
    if isinstance(model, FasterRCNN):
        return sum(model(*inputs).values())
    images, labels = inputs
    return F.cross_entropy(model(images), labels)


def check_autocast_support(variants, device):
    """--amp on a device where an op has no autocast kernel fails deep inside the op (dtype
    mismatch): say which variants cannot run instead."""
    key = 'AutocastCUDA' if device.type == 'cuda' else 'AutocastCPU'
    unsupported = [v for v in variants
                   if v in OPS and not torch._C._dispatch_has_kernel_for_dispatch_key(OPS[v], key)]
    if unsupported:
        raise ValueError(f'--amp on {device.type}: the ops of the variants {unsupported} have no '
                         f'{key} kernel; time them in float32 or on a GPU')


def judge(row, torchvision_dcn, device):
    """The GPU targets of a DK variant: '' for the others, 'yes' or what is missed."""
    if row['variant'] not in TIME_TARGETS:
        return ''
    if device.type != 'cuda':
        return 'not judged on a CPU'
    missed = []
    if row['time_ratio'] > TIME_TARGETS[row['variant']]:
        missed.append(f'time {row["time_ratio"]:.2f}x')
    if row['memory_ratio'] > MEMORY_TARGET:
        missed.append(f'memory {row["memory_ratio"]:.2f}x')
    if torchvision_dcn is not None and row['step_ms'] >= torchvision_dcn['step_ms']:
        missed.append('not faster than torchvision DCN')
    return 'no: ' + ', '.join(missed) if missed else 'yes'


def benchmark_model(model_name, args, device, amp_dtype):
    """One row (a dict) per variant of ``model_name``, in the order of args.variants."""
    models = build_variants(model_name, args.variants, args.image_size, args.seed)
    inputs = make_inputs(model_name, args.batch, args.image_size, device, args.seed)
    trainees = [Trainee(model.to(device), training_loss, inputs, device, amp_dtype,
                        args.seed)
                for model in models.values()]
    # what ran: {class name: count} of the conv2 of layer2-4
    rows = timed_rows(trainees, args.variants, lambda model: dict(collections.Counter(
        type(conv).__name__ for _, conv in replaced_convs(model))), device, args.repeats)
    torchvision_dcn = next((row for row in rows if row['variant'] == 'torchvision_dcn'), None)
    for row in rows:
        row['model'] = model_name
        row['target_met'] = judge(row, torchvision_dcn, device)
    return rows


def target_text(variant):
    if variant not in TIME_TARGETS:
        return ''
    return (f'time <= {TIME_TARGETS[variant]:.2f}x, memory <= {MEMORY_TARGET:.2f}x, '
            f'faster than torchvision DCN')


def markdown_row(row):
    memory = (f'{row["peak_mib"]:.0f} | {row["memory_ratio"]:.2f}'
              if row['peak_mib'] is not None else 'not measured | -')
    layers = ', '.join(f'{count} {name}' for name, count in row['layers'].items())
    return (f'| {row["model"]} | {LABELS[row["variant"]]} | {layers} | '
            f'{row["step_ms"]:.1f} | {row["time_ratio"]:.2f} | {memory} | '
            f'{row["first_loss"]:.4f} ({row["first_loss_gap"]:.1e}) | '
            f'{target_text(row["variant"])} | {row["target_met"]} |')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', choices=list(MODELS), default=list(MODELS))
    add_step_arguments(parser, LABELS, batch=2, image_size=(800, 1333))
    args = parser.parse_args(argv)
    check_step_arguments(parser, args, last_stage='layer4')
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    amp_dtype = getattr(torch, args.amp) if args.amp else None
    if amp_dtype is not None:
        check_autocast_support(args.variants, device)
    print(settings_line(args, device, torchvision=torchvision.__version__))
    print('| model | conv2 of layer2-4 | layers | step ms | x rigid | peak MiB | x rigid '
          '| step-0 loss (gap to rigid) | GPU target | met |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    rows = []
    for model_name in args.models:
        model_rows = benchmark_model(model_name, args, device, amp_dtype)
        for row in model_rows:
            print(markdown_row(row), flush=True)
        rows += model_rows
    finish_report(rows, args, device, torchvision=torchvision.__version__)
    return rows


if __name__ == '__main__':
    main()
