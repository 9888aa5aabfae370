"""The resources of every nvcc-compiled CUDA kernel, from ptxas's report in a build log, as a
Markdown table; fails where a hot kernel spills registers or keeps an array in local memory.

`make cuda-check` builds the extension with `NVCC_APPEND_FLAGS=-Xptxas=-v`, so that ptxas
reports, for every kernel and architecture, its registers per thread, stack frame (local-memory
arrays live there), spill stores and loads, and static shared memory; this tool reads that log:

    python tools/analysis_tools/cuda_resources.py BUILD_LOG [--arch sm_90]

Dynamic shared memory is 0 for all of them: DK_LAUNCH (dk_ops/csrc/cuda/launch.cuh) launches
every kernel with none. The hot kernels, HOT_KERNELS, are those that sample for every element
of a local, global or depthwise DK layer (the opt-in implicit GEMMs among them): a stack frame
or a spill there costs local-memory traffic on every element, so the tool exits with status 1 if
one has either.
"""
import argparse
import dataclasses
import re
import subprocess
import sys

# The sampling passes of the columns path, of the implicit GEMMs, of the global path and of the
# depthwise path (whose other kernels share the columns path's names).
HOT_KERNELS = ('scope_columns_kernel', 'input_grad_rigid_kernel', 'input_grad_atomic_kernel',
               'kernel_offset_grad_kernel', 'data_offset_and_mask_grad_kernel',
               'global_filters_kernel', 'global_weight_grad_kernel',
               'global_offset_grad_kernel', 'forward_kernel', 'weight_grad_kernel',
               'scope_grad_kernel')

COLUMNS = ('kernel', 'registers/thread', 'spill stores', 'spill loads', 'stack',
           'static smem', 'dynamic smem')


@dataclasses.dataclass
class KernelResources:
    name: str  # demangled, without namespaces and parameters: scope_columns_kernel<float>
    arch: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    static_smem: int = 0
    dynamic_smem: int = 0
    local: int = 0  # bytes of local memory beyond the stack frame (cuobjdump's LOCAL)

    @property
    def base_name(self) -> str:
        return self.name.split('<')[0]

    def problems(self):
        """What makes this kernel fail the check (empty when nothing)."""
        found = []
        if self.stack:
            found.append(f'{self.stack} bytes of stack frame (a local-memory array)')
        if self.local:
            found.append(f'{self.local} bytes of local memory')
        if self.spill_stores or self.spill_loads:
            found.append(f'{self.spill_stores} bytes of spill stores and {self.spill_loads} '
                         'of spill loads')
        return found


ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
FRAME = re.compile(r'(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads')
USED = re.compile(r'Used (\d+) registers')
SMEM = re.compile(r'(\d+) bytes smem')


def short_names(mangled):
    """Demangled names without namespaces, return type and parameters, through c++filt."""
    demangled = subprocess.run(['c++filt'], input='\n'.join(mangled), capture_output=True,
                               text=True, check=True).stdout.splitlines()
    short = []
    for name in demangled:
        name = name.replace('(anonymous namespace)::', '').split('(')[0].removeprefix('void ')
        short.append(re.sub(r'\b(?:\w+::)+', '', name))
    return short


def parse_ptxas_report(log: str):
    """Every kernel of ptxas -v's report in `log`, in order (a kernel compiled for several
    architectures appears once for each)."""
    kernels = []
    for line in log.splitlines():
        if match := ENTRY.search(line):
            kernels.append(KernelResources(match.group(1), match.group(2)))
        elif kernels and (match := FRAME.search(line)):
            kernels[-1].stack, kernels[-1].spill_stores, kernels[-1].spill_loads = (
                int(group) for group in match.groups())
        elif kernels and (match := USED.search(line)):
            kernels[-1].registers = int(match.group(1))
            smem = SMEM.search(line)
            kernels[-1].static_smem = int(smem.group(1)) if smem else 0
    for kernel, name in zip(kernels, short_names([kernel.name for kernel in kernels])):
        kernel.name = name
    return kernels


def markdown_table(kernels):
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    for k in kernels:
        lines.append(f'| {k.name} | {k.registers} | {k.spill_stores} | {k.spill_loads} | '
                     f'{k.stack} | {k.static_smem} | {k.dynamic_smem} |')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('log', help='a build log with ptxas -v output')
    parser.add_argument('--arch', default='sm_90')
    args = parser.parse_args()
    with open(args.log) as log:
        kernels = [k for k in parse_ptxas_report(log.read()) if k.arch == args.arch]
    if not kernels:
        sys.exit(f'cuda_resources: no ptxas report for {args.arch} in {args.log} '
                 '(built without -Xptxas=-v, or for other architectures?)')
    print(f'CUDA kernels compiled for {args.arch} (bytes):')
    print(markdown_table(kernels))
    failures = [f'{k.name}: {problem}' for k in kernels if k.base_name in HOT_KERNELS
                for problem in k.problems()]
    if failures:
        sys.exit('cuda_resources: hot kernels use local memory:\n  ' + '\n  '.join(failures))


if __name__ == '__main__':
    main()
