"""A performance model of the operator's GPU paths, from the H100 SXM's published peaks: for
each benchmark case, the FLOPs and bytes that cuDNN's convolution, the columns path and the
fused path move in a training step (forward + backward), and the time ratios they predict.

    python tools/analysis_tools/gpu_model.py [--batch 2 8]

Each pass of a step takes max(compute, memory) time (a roofline): its GEMM FLOPs at the tensor
cores' dense peak (TF32 for float32, as cuDNN's convolutions and, following their switch, the
op's GEMMs use; bfloat16's for bfloat16), its sampling FLOPs at the CUDA cores' float32 peak,
and its bytes at the HBM bandwidth. A path's time is the sum over its passes; the ratio is the
path's over the convolution's. The model counts the compulsory traffic of each pass (every
tensor a pass reads or writes, once) and takes every pass at its peak, so its ratios are a
floor: launch latency, caches and occupancy are left out. A GPU run measures them
(docs/gpu.md#performance-model).

The passes, for N images of C channels, L = H * W output locations (3x3 kernel, stride 1,
padding 1), M = N * L columns, T = 9 taps and S scope cells (9 or 16):
  conv     forward, data gradient, filter gradient: each 2*M*C*C*T FLOPs, and each reads two
           (N, C, H, W) tensors and writes one (filters are small).
  columns  the CUDA kernels and GEMMs of the default path (deform_kernel_conv2d_driver.cpp):
           Z (M x S*C) is written by the forward's and the backward's scope-column passes and
           as grad Z by a GEMM, and read by the two GEMMs with W' and by the input- and
           offset-gradient passes; plus the layout copies around them.
  fused    the same products with Z built in registers / shared memory from the samples: the
           forward, the weight gradient and the grad-Z pass, each
           reading its operands and writing its results once, Z never in memory.
Sampling work, per (column, channel, tap): SAMPLE_FLOPS to sample the input (4 corners
with data offsets, 1 pixel on the rigid grid), SCOPE_FLOPS to spread it over the scope's 4
corners (or gather them back in the backward).
"""
import argparse
import dataclasses

# NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: TF32 Tensor Core 989 TFLOPS and
# BF16 Tensor Core 1,979 TFLOPS, both "with sparsity" (dense: half), FP32 67 TFLOPS, GPU
# memory bandwidth 3.35 TB/s.
PEAK_FLOPS = {'tf32': 989e12 / 2, 'bfloat16': 1979e12 / 2, 'float32_cuda_cores': 67e12}
BANDWIDTH = 3.35e12  # bytes / s

STAGES = {'c3': (128, 100), 'c4': (256, 50), 'c5': (512, 25)}  # as benchmark_op.py's
TAPS = 9
SAMPLE_FLOPS = {'rigid': 2, 'deformable': 8}  # one pixel; 4 corners, weighted and summed
SCOPE_FLOPS = 8                               # 4 scope corners, a weight times the value each
ELEMENT_BYTES = {'float32': 4, 'bfloat16': 2}
GEMM_PEAK = {'float32': 'tf32', 'bfloat16': 'bfloat16'}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # as benchmark_op.py names it
    scope: int = 4
    data_offset: bool = False
    global_offset: bool = False


CASES = (Case('DK local, scope 3', scope=3), Case('DK local, scope 4'),
         Case('DK+DCN, scope 4', data_offset=True), Case('DK global, scope 4', global_offset=True))


@dataclasses.dataclass
class Pass:
    name: str
    gemm_flops: float = 0.0
    sampling_flops: float = 0.0
    bytes: float = 0.0

    def seconds(self, dtype):
        compute = (self.gemm_flops / PEAK_FLOPS[GEMM_PEAK[dtype]] +
                   self.sampling_flops / PEAK_FLOPS['float32_cuda_cores'])
        return max(compute, self.bytes / BANDWIDTH)


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    channels: int
    size: int
    dtype: str

    @property
    def columns(self):  # M = N * L
        return self.batch * self.size * self.size

    @property
    def activation_bytes(self):  # one (N, C, H, W) tensor
        return self.columns * self.channels * ELEMENT_BYTES[self.dtype]


def conv_passes(shape):
    """cuDNN's forward, data gradient and filter gradient, each an implicit GEMM."""
    flops = 2 * shape.columns * shape.channels * shape.channels * TAPS
    return [Pass(name, gemm_flops=flops, bytes=3 * shape.activation_bytes)
            for name in ('forward', 'data gradient', 'filter gradient')]


def offsets_bytes(shape, case):
    """The offsets (and, with data offsets, the data offsets) a sampling pass reads."""
    per_column = 2 * TAPS * (2 if case.data_offset else 1)
    return per_column * shape.columns * ELEMENT_BYTES[shape.dtype]


def sampling_flops(shape, case):
    """Sampling the input and spreading it over the scope, for every (column, channel, tap)."""
    per_tap = SAMPLE_FLOPS['deformable' if case.data_offset else 'rigid'] + SCOPE_FLOPS
    return shape.columns * shape.channels * TAPS * per_tap


def columns_passes(shape, case):
    e = ELEMENT_BYTES[shape.dtype]
    z = shape.columns * case.scope ** 2 * shape.channels * e  # Z or grad Z
    act, offsets = shape.activation_bytes, offsets_bytes(shape, case)
    gemm = 2 * shape.columns * shape.channels * case.scope ** 2 * shape.channels
    sample = sampling_flops(shape, case)
    # The input gradient is summed in float32, then cast and laid out as NCHW.
    grad_input = shape.columns * shape.channels * 4
    return [
        Pass('input to channels-last (forward and backward)', bytes=4 * act),
        Pass('scope columns (forward)', sampling_flops=sample, bytes=act + offsets + z),
        Pass('Z @ W\'^T', gemm_flops=gemm, bytes=z + 2 * act),  # Z, output rows, their copy
        Pass('output and its gradient to/from rows', bytes=4 * act),
        Pass('scope columns (backward)', sampling_flops=sample, bytes=act + offsets + z),
        Pass('Z^T @ gO', gemm_flops=gemm, bytes=z + act),
        Pass('grad Z = gO @ W\'', gemm_flops=gemm, bytes=act + z),
        Pass('input gradient', sampling_flops=sample, bytes=z + offsets + 2 * grad_input),
        Pass('offset gradients', sampling_flops=sample, bytes=z + act + 2 * offsets),
        Pass('input gradient to NCHW', bytes=grad_input + act),
    ]


def fused_passes(shape, case):
    act, offsets = shape.activation_bytes, offsets_bytes(shape, case)
    gemm = 2 * shape.columns * shape.channels * case.scope ** 2 * shape.channels
    sample = sampling_flops(shape, case)
    return [
        Pass('forward', gemm_flops=gemm, sampling_flops=sample, bytes=2 * act + offsets),
        Pass('weight gradient', gemm_flops=gemm, sampling_flops=sample, bytes=2 * act + offsets),
        Pass('grad Z, input and offset gradients', gemm_flops=gemm, sampling_flops=2 * sample,
             bytes=3 * act + 3 * offsets),
    ]


def global_passes(shape, case):
    """Global DK: one grouped convolution of the batch with its sampled filters; the filters'
    sampling and gradients are C * C * T values an image, next to nothing."""
    return conv_passes(shape)


@dataclasses.dataclass
class Row:
    stage: str
    shape: Shape
    case: Case
    conv: list
    columns: list
    fused: list

    def totals(self, passes):
        return (sum(p.gemm_flops + p.sampling_flops for p in passes) / 1e9,
                sum(p.bytes for p in passes) / 1e6,
                sum(p.seconds(self.shape.dtype) for p in passes))


def rows(batches, dtypes=('float32', 'bfloat16')):
    for dtype in dtypes:
        for batch in batches:
            for stage, (channels, size) in STAGES.items():
                shape = Shape(batch, channels, size, dtype)
                for case in CASES:
                    if case.global_offset:
                        columns = fused = global_passes(shape, case)
                    else:
                        columns, fused = columns_passes(shape, case), fused_passes(shape, case)
                    yield Row(stage, shape, case, conv_passes(shape), columns, fused)


def markdown_table(table_rows):
    lines = ['| dtype | batch | stage | case | conv GFLOP | conv MB | columns GFLOP | columns MB '
             '| fused GFLOP | fused MB | conv us | columns / conv | fused / conv |',
             '|' + '---|' * 13]
    for row in table_rows:
        conv, columns, fused = (row.totals(p) for p in (row.conv, row.columns, row.fused))
        dtype = 'float32 (TF32)' if row.shape.dtype == 'float32' else row.shape.dtype
        lines.append(f'| {dtype} | {row.shape.batch} | {row.stage} | {row.case.name} | '
                     f'{conv[0]:.1f} | {conv[1]:.0f} | {columns[0]:.1f} | {columns[1]:.0f} | '
                     f'{fused[0]:.1f} | {fused[1]:.0f} | {conv[2] * 1e6:.0f} | '
                     f'{columns[2] / conv[2]:.2f}x | {fused[2] / conv[2]:.2f}x |')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, nargs='+', default=[2, 8])
    args = parser.parse_args()
    print(markdown_table(rows(args.batch)))


if __name__ == '__main__':
    main()
