"""What the training-step benchmarks share (benchmark_backbone.py, benchmark_rtmdet.py): a
variant's SGD step with its peak memory, a DK layer that starts as the rigid conv it replaces,
the rows of the round-robin timing and the options. Only torch and dk_ops are imported (and
benchmark_op, beside it), so that a GPU machine without torchvision or mmcv can run the
benchmarks that need neither."""
import json
import math

import torch
from torch import nn

import dk_ops
from benchmark_op import median_times


def deform_kernel_from_rigid(layer_class, rigid: nn.Conv2d) -> nn.Module:
    """A dk_ops layer (default scope: kernel + 1) whose zero-offset kernel is ``rigid``'s."""
    layer = layer_class(rigid.in_channels, rigid.out_channels, rigid.kernel_size,
                        stride=rigid.stride, padding=rigid.padding, dilation=rigid.dilation,
                        groups=rigid.groups, bias=False)  # the replaced convs have none: BN follows
    with torch.no_grad():
        layer.weight.copy_(dk_ops.rigid_to_scope(rigid.weight, layer.scope_size))
    return layer


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


class Trainee:
    """One variant's model, SGD optimizer (mmdet's momentum and decay) and step function;
    ``loss_fn(model, inputs)`` gives the step's loss.

    ``step`` records the loss of every step and, on CUDA, the step's peak memory: the peak
    the allocator saw during the step, less what was allocated when it began (the other
    variants' models among it), plus this model's own parameters, buffers and optimizer state.
    """

    def __init__(self, model, loss_fn, inputs, device, amp_dtype, seed):
        self.model, self.loss_fn, self.inputs = model, loss_fn, inputs
        self.device, self.amp_dtype, self.seed = device, amp_dtype, seed
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                         lr=0.01, momentum=0.9, weight_decay=1e-4)
        # float16 needs loss scaling against underflowing gradients; bfloat16 has float32's range.
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        self.losses, self.peak_bytes = [], []

    def resident_bytes(self):
        state = [t for s in self.optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor)]
        return tensor_bytes([*self.model.parameters(), *self.model.buffers(), *state])

    def step(self):
        on_cuda = self.device.type == 'cuda'
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            start_bytes = torch.cuda.memory_allocated(self.device) - self.resident_bytes()
        torch.manual_seed(self.seed)  # a detector's box sampling: the same in every variant
        with torch.autocast(self.device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None):
            loss = self.loss_fn(self.model, self.inputs)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        # Gradients freed here, not kept until the next step, so that they count in this step's
        # peak and not in the start of the other variants' steps.
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        if on_cuda:
            self.peak_bytes.append(torch.cuda.max_memory_allocated(self.device) - start_bytes)


def timed_rows(trainees, variants, layers_of, device, repeats):
    """One row (a dict) per variant, rigid's first, timed round-robin with benchmark_op's
    median_times: what ran (``layers_of(model)``: {class name: count} of the replaced layers),
    the median step, the peak memory of the timed rounds (the first step, round 0, warmed up),
    the first and last losses, and each as a ratio or gap to rigid's."""
    seconds = median_times([t.step for t in trainees], device, repeats)
    rows = [{
        'variant': variant,
        'layers': layers_of(trainee.model),
        'step_ms': time_ * 1e3,
        'peak_mib': max(trainee.peak_bytes[1:]) / 2**20 if trainee.peak_bytes else None,
        'first_loss': trainee.losses[0],
        'last_loss': trainee.losses[-1],
    } for variant, trainee, time_ in zip(variants, trainees, seconds)]
    rigid = rows[0]
    for row in rows:
        row['time_ratio'] = row['step_ms'] / rigid['step_ms']
        row['memory_ratio'] = (row['peak_mib'] / rigid['peak_mib']
                               if row['peak_mib'] is not None else None)
        row['first_loss_gap'] = abs(row['first_loss'] - rigid['first_loss']) / abs(
            rigid['first_loss'])
    return rows


def add_step_arguments(parser, variants, batch, image_size):
    """The options both benchmarks take, with their defaults of batch and image size."""
    parser.add_argument('--variants', nargs='+', choices=list(variants), default=list(variants),
                        help='rigid, the reference of the ratios, first whether named or not')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch', type=int, default=batch)
    parser.add_argument('--image-size', type=int, nargs=2, default=list(image_size),
                        metavar=('HEIGHT', 'WIDTH'))
    parser.add_argument('--repeats', type=int, default=10, help='timed rounds (after one warm-up)')
    parser.add_argument('--amp', choices=['bfloat16', 'float16'], default=None,
                        help='autocast to this dtype (float16 with a gradient scaler)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', help='also write the rows to this file')


def check_step_arguments(parser, args, last_stage):
    """Refuses sizes a training step cannot take, and puts rigid first among the variants."""
    if args.batch < 1 or args.repeats < 1:
        parser.error(f'--batch {args.batch} and --repeats {args.repeats} must be at least 1')
    # BatchNorm in training needs more than one value per channel, also in the last stage's
    # output, which is 1/32 of the image (rounded up).
    last_stage_values = args.batch * math.prod(math.ceil(side / 32) for side in args.image_size)
    if min(args.image_size) < 1 or last_stage_values < 2:
        parser.error(f'--image-size {args.image_size} with --batch {args.batch}: {last_stage} '
                     f'would give BatchNorm one value per channel; use 64 64 or a batch of 2')
    args.variants = ['rigid'] + [v for v in args.variants if v != 'rigid']


def device_description(device):
    """The device, with its TF32 switches on CUDA or its thread count on the CPU."""
    if device.type == 'cuda':
        return (f'{torch.cuda.get_device_name(device)}, TF32 in cuDNN convs '
                f'{torch.backends.cudnn.allow_tf32}, in GEMMs '
                f'{torch.backends.cuda.matmul.allow_tf32}')
    return f'threads={torch.get_num_threads()}'


def settings_line(args, device, **versions):
    """A benchmark's first line: the device, the precision, the sizes and the libraries."""
    height, width = args.image_size
    libraries = ' '.join(f'{name}={version}'
                         for name, version in dict(torch=torch.__version__, **versions).items())
    return (f'device={device} ({device_description(device)}) '
            f'precision={"AMP " + args.amp if args.amp else "float32"} batch={args.batch} '
            f'image={width}x{height} repeats={args.repeats} {libraries}')


def finish_report(rows, args, device, **versions):
    """What follows a benchmark's table: the notes on memory and on non-finite losses, and the
    rows in args.json where asked for."""
    if device.type != 'cuda':
        print('Peak memory is measured on CUDA only (torch.cuda.max_memory_allocated).')
    not_finite = [' '.join(row[key] for key in ('model', 'variant') if key in row)
                  for row in rows if not math.isfinite(row['last_loss'])]
    if not_finite:
        print(f'Warning: the loss became non-finite in {not_finite}: their times are not those '
              f'of normal training')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'device': str(device), 'where': device_description(device),
                       'amp': args.amp, 'batch': args.batch, 'image_size': args.image_size,
                       'repeats': args.repeats, 'torch': torch.__version__, **versions,
                       'rows': rows}, f, indent=1)
