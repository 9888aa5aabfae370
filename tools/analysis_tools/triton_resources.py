"""The resources of the fused path's Triton kernels (dk_ops/fused/kernels.py), compiled ahead of
time for sm_90 on any machine (no GPU needed), as a Markdown table; fails where one spills
registers or keeps an array in local memory.

Every kernel is compiled with every tile shape its autotuner may pick
(``dk_ops.fused.op.TUNING_TILES``), in float32 and bfloat16, for a 4 x 4 scope (16 cells) with
data offsets and a mask (the most code a kernel has):

    python tools/analysis_tools/triton_resources.py [--jobs 2]

Registers, stack frame, local memory and static shared memory are read from the cubin with the
cuobjdump that Triton ships (``-res-usage``); spill stores and loads from Triton's ptxas run
again with ``-v`` on the same PTX; dynamic shared memory (Triton's pipelining buffers) from the
compiled kernel's metadata. Needs Triton (``make cuda-check`` runs it in .venv-cuda), not dk_ops's
compiled extension: the kernels module is loaded from its file.
"""
import argparse
import concurrent.futures
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = GPUTarget('cuda', 90, 32)
DTYPES = {'float32': ('fp32', tl.float32), 'bfloat16': ('bf16', tl.bfloat16)}
# Pointers to tensors in the op's dtype; every other pointer is to float32.
DTYPE_POINTERS = {'input', 'weight', 'bias', 'output', 'grad_output'}
FLOAT32_POINTERS = {'kernel_offset', 'data_offset', 'mask', 'grad_weight_parts', 'grad_input',
                    'grad_kernel_offset', 'grad_data_offset', 'grad_mask'}
FLOAT_SCALARS = {'scope_shift_h', 'scope_shift_w'}
KERNELS = ('forward_kernel', 'weight_grad_kernel', 'sampling_grad_kernel')
S_PAD = 16


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered, so that the worker processes' KernelResources pickle back to this class.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


kernels = load_module(os.path.join(ROOT, 'dk_ops', 'fused', 'kernels.py'), 'fused_kernels')
# The table and the check of the CUDA kernels' resources (make cuda-check), for these too.
cuda_resources = load_module(os.path.join(ROOT, 'tools', 'analysis_tools', 'cuda_resources.py'),
                             'cuda_resources')
KernelResources, markdown_table = cuda_resources.KernelResources, cuda_resources.markdown_table


def tuning_tiles():
    """TUNING_TILES from dk_ops/fused/op.py, read without importing dk_ops (its extension)."""
    with open(os.path.join(ROOT, 'dk_ops', 'fused', 'op.py')) as source:
        match = re.search(r'^TUNING_TILES = (\[.*?\])$', source.read(), re.S | re.M)
    return eval(match.group(1), {})  # a literal list of tuples of ints


def compile_kernel(kernel_name, dtype_name, tile):
    block_l, block_o, block_c, warps, stages = tile
    fn = getattr(kernels, kernel_name)
    pointer_type, dtype = DTYPES[dtype_name]
    constants = dict(HAS_DATA_OFFSET=True, HAS_MASK=True, HAS_BIAS=True, DTYPE=dtype,
                     DOT_IN_FLOAT32=False, DOT_PRECISION='tf32', S_PAD=S_PAD, BLOCK_L=block_l,
                     BLOCK_O=block_o, BLOCK_C=block_c)
    constants = {name: value for name, value in constants.items() if name in fn.arg_names}
    signature = {name: 'constexpr' if name in constants else
                 f'*{pointer_type}' if name in DTYPE_POINTERS else
                 '*fp32' if name in FLOAT32_POINTERS else
                 'fp32' if name in FLOAT_SCALARS else 'i32'
                 for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constants), target=TARGET,
                              options=dict(num_warps=warps, num_stages=stages))
    return resources(compiled, f'{kernel_name} {dtype_name} L{block_l} O{block_o} C{block_c} '
                     f'w{warps} s{stages}')


def triton_tool(name):
    return os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', name)


def resources(compiled, name):
    with tempfile.TemporaryDirectory() as scratch:
        cubin = os.path.join(scratch, 'kernel.cubin')
        ptx = os.path.join(scratch, 'kernel.ptx')
        with open(cubin, 'wb') as file:
            file.write(compiled.asm['cubin'])
        with open(ptx, 'w') as file:
            file.write(compiled.asm['ptx'])
        usage = subprocess.run([triton_tool('cuobjdump'), '-res-usage', cubin],
                               capture_output=True, text=True, check=True).stdout
        report = subprocess.run([triton_tool('ptxas'), '-v', '--gpu-name=sm_90a', ptx, '-o',
                                 os.path.join(scratch, 'again.cubin')],
                                capture_output=True, text=True, check=True).stderr
    fields = dict(re.findall(r'\b(REG|STACK|SHARED|LOCAL):(\d+)', usage))
    spills = re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', report)
    return KernelResources(name, 'sm_90', registers=int(fields['REG']),
                           spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
                           stack=int(fields['STACK']), static_smem=int(fields['SHARED']),
                           dynamic_smem=compiled.metadata.shared, local=int(fields['LOCAL']))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--jobs', type=int, default=os.cpu_count(),
                        help='kernels compiled at once (default: one per CPU)')
    args = parser.parse_args()
    jobs = [(kernel, dtype, tile) for kernel in KERNELS for dtype in DTYPES
            for tile in tuning_tiles()]
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(compile_kernel, *zip(*jobs)))
    print(f'Triton {triton.__version__} kernels of the fused path compiled for sm_90, '
          f'scope {S_PAD} cells, data offsets and mask (bytes; the kernel column names the dtype '
          'and the tile: locations, output channels, input channels, warps, stages):')
    print(markdown_table(rows))
    failures = [f'{row.name}: {problem}' for row in rows for problem in row.problems()]
    if failures:
        sys.exit('triton_resources: kernels use local memory:\n  ' + '\n  '.join(failures))


if __name__ == '__main__':
    main()
