"""The CPU loops' vector clones (dk_ops/csrc/cpu/vector_clones.h), read from the built extension
with binutils: each loop has the versions its build asks for, and each version runs on the
registers of its ISA.

A default GCC build on x86-64 holds an AVX-512, an AVX2 and a baseline version of the wide loops
(the per-channel depthwise kernels) and an AVX2 and a baseline version of the others; the loader
picks one per CPU. The build switch DK_OPS_VECTOR_ISA, which `make test-isa` sets for the build
and for this test, compiles one version only, for the ISA it names.
"""
import functools
import os
import platform
import re
import subprocess

import pytest

import dk_ops._C

pytestmark = pytest.mark.skipif(platform.machine() != 'x86_64',
                                reason='the vector clones are x86-64 machine code')

EXTENSION = dk_ops._C.__file__
WIDE_LOOPS = ['forward_channel', 'backward_channel']
LOOPS = WIDE_LOOPS + ['forward_row', 'backward_row', 'scatter_columns', 'gather_columns',
                      'gather_rigid_pixels', 'offset_and_mask_columns', 'sample_filters_run',
                      'weight_grad_run', 'offset_grad_run']
# The widest vector register each version may use, and the one it must use: the per-channel
# kernels' inner loops are plain contiguous arithmetic that GCC vectorises at every width.
REGISTERS = {'arch_x86_64_v4': 'zmm', 'arch_x86_64_v3': 'ymm', 'default': 'xmm'}
# The same for a loop without clones, by the build's DK_OPS_VECTOR_ISA (None: not set).
ISA_REGISTERS = {'x86-64-v3': 'ymm', 'x86-64': 'xmm', None: 'xmm'}


def tool_output(*command):
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


@functools.cache
def built_by_gcc():
    comment = tool_output('readelf', '-p', '.comment', EXTENSION)
    return 'GCC:' in comment and 'clang' not in comment


@functools.cache
def extension_symbols():
    """(address, size, demangled name) of every function nm lists with a size."""
    lines = tool_output('nm', '-C', '-S', EXTENSION).splitlines()
    fields = (re.fullmatch(r'([0-9a-f]+) ([0-9a-f]+) [tT] (.*)', line) for line in lines)
    return [(int(f[1], 16), int(f[2], 16), f[3]) for f in fields if f]


def expected_versions(loop):
    """The clone suffixes nm shows for a loop (an empty set: no clones)."""
    isa = os.environ.get('DK_OPS_VECTOR_ISA')
    if isa is not None or not built_by_gcc():
        return set()
    return set(REGISTERS) if loop in WIDE_LOOPS else {'arch_x86_64_v3', 'default'}


def float_loop_symbols(loop):
    """{clone suffix or '': (address, size)} of the loop's float instantiations."""
    # The function itself: not a lambda inside it, a helper instantiated for it, its cold part
    # or the clones' resolver.
    name = re.compile(rf'\w+ dk_ops::\(anonymous namespace\)::{loop}<[^<>]*float>\(.*\)'
                      r'(?: \[clone \.(\w+)\])?')
    symbols = {}
    for address, size, symbol in extension_symbols():
        match = name.fullmatch(symbol)
        if match and '{lambda' not in symbol and match[1] not in ('resolver', 'cold'):
            symbols[match[1] or ''] = (address, size)
    return symbols


def widest_register(address, size):
    code = tool_output('objdump', '-d', '--no-show-raw-insn', f'--start-address={address:#x}',
                       f'--stop-address={address + size:#x}', EXTENSION)
    for register in ('zmm', 'ymm', 'xmm'):
        if re.search(rf'%{register}\d', code):
            return register
    return None


@pytest.mark.parametrize('loop', LOOPS)
def test_each_loop_has_the_versions_its_build_asks_for(loop):
    # Without clones a loop is one plain function, or none where GCC inlined it into its caller.
    versions = set(float_loop_symbols(loop)) - {''}
    expected = expected_versions(loop)
    assert versions == expected, (loop, sorted(versions), sorted(expected))


@pytest.mark.parametrize('loop', WIDE_LOOPS)
def test_each_version_runs_on_the_registers_of_its_isa(loop):
    isa = os.environ.get('DK_OPS_VECTOR_ISA')
    symbols = float_loop_symbols(loop)
    assert symbols, f'{loop} is not a function of its own in {EXTENSION}'
    for version, (address, size) in symbols.items():
        register = REGISTERS[version] if version else ISA_REGISTERS[isa]
        assert widest_register(address, size) == register, (loop, version or isa)
