"""Builds the dk_ops._C extension and installs the dk_ops and dk_mmdet packages.

A CppExtension by default; a CUDAExtension (adding csrc/cuda/*.cu) when CUDA is available
or FORCE_CUDA=1, so GPU builds also work on machines without a GPU. TORCH_CUDA_ARCH_LIST
picks the architectures, as for any torch extension; without it and without a GPU to ask,
the build takes DEFAULT_CUDA_ARCHS.

A second extension, dk_ops._C_emulated_cuda, is for the test suite: the CUDA kernels compiled
for host threads (csrc/emulated_cuda/), which the tests run on a CPU. It links to dk_ops._C,
whose driver it calls. It is built in place (`build_ext --inplace`, a developer's tree) and
where DK_OPS_EMULATED_CUDA=1 (`make build` sets it); a wheel, as `pip install .` builds, leaves
it out: users would pay its compile time and never call it.
"""
import glob
import os
import re
import subprocess

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join('dk_ops', 'csrc')

# The GPUs a build without TORCH_CUDA_ARCH_LIST and without a visible GPU runs on: binaries for
# Turing (7.5), Ampere (8.0, which the 8.6 and 8.9 GPUs run too) and Hopper (9.0), and PTX that
# the driver compiles for any newer GPU at its first launch.
DEFAULT_CUDA_ARCHS = '7.5;8.0;9.0+PTX'

# The sources are C++20, which nvcc accepts from CUDA 12 and g++ from version 10.
OLDEST_CUDA = (12, 0)
OLDEST_GCC = 10


def use_cuda() -> bool:
    if os.environ.get('FORCE_CUDA', '0') == '1':
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def cuda_arch_list(environ, gpu_visible: bool):
    """The TORCH_CUDA_ARCH_LIST to build with: the one given, else none where torch reads the
    visible GPU's own architecture, else DEFAULT_CUDA_ARCHS (torch itself would raise an
    IndexError on the empty list of visible GPUs)."""
    given = environ.get('TORCH_CUDA_ARCH_LIST')
    if given or gpu_visible:
        return given
    return DEFAULT_CUDA_ARCHS


def version_tuple(text: str):
    """(major, minor) from a version string such as '12.4', '13.0.88' or '10'."""
    numbers = [int(part) for part in re.findall(r'\d+', text)[:2]]
    return tuple(numbers + [0] * (2 - len(numbers)))


def toolchain_problems(cuda_version, gcc_version):
    """What keeps this CUDA toolkit and g++ from compiling the C++20 sources, in plain words
    (empty when nothing does); cuda_version is None for a CPU build, gcc_version None for a
    compiler that is not g++."""
    problems = []
    if cuda_version is not None and version_tuple(cuda_version) < OLDEST_CUDA:
        problems.append(f'CUDA {cuda_version} is too old: the CUDA kernels are C++20, which nvcc '
                        f'compiles from CUDA {OLDEST_CUDA[0]}.{OLDEST_CUDA[1]}')
    if gcc_version is not None and version_tuple(gcc_version)[0] < OLDEST_GCC:
        problems.append(f'g++ {gcc_version} is too old: the sources are C++20, which g++ '
                        f'compiles from version {OLDEST_GCC}')
    return problems


def gcc_version(compiler: str):
    """The version of `compiler` if it is g++, else None (clang, say, is not checked here)."""
    try:
        banner = subprocess.run([compiler, '--version'], capture_output=True, text=True,
                                check=True).stdout
        version = subprocess.run([compiler, '-dumpfullversion', '-dumpversion'],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return None if 'clang' in banner.lower() else version


def check_toolchain(cuda: bool):
    """Stops the build before any compiling, with the reason, where the toolchain is too old."""
    problems = toolchain_problems(torch.version.cuda if cuda else None,
                                  gcc_version(os.environ.get('CXX', 'c++')))
    if problems:
        raise SystemExit('dk_ops cannot be built here:\n  ' + '\n  '.join(problems))


# DK_OPS_VECTOR_ISA (`make test-isa`): the CPU loops that the loader otherwise picks among clones
# for (cpu/vector_clones.h) compiled for this one ISA, so that the tests can run each clone.
VECTOR_ISA_MACROS = {'x86-64-v3': '-DDK_VECTOR_ISA_X86_64_V3', 'x86-64': '-DDK_VECTOR_ISA_X86_64'}


def vector_isa_flags(environ):
    isa = environ.get('DK_OPS_VECTOR_ISA')
    if isa is None:
        return []
    if isa not in VECTOR_ISA_MACROS:
        raise SystemExit(f'DK_OPS_VECTOR_ISA must be one of {sorted(VECTOR_ISA_MACROS)} '
                         f'(or unset), got {isa!r}')
    return [VECTOR_ISA_MACROS[isa]]


def cxx_flags():
    optimisation = ['-O0', '-g'] if os.environ.get('DEBUG', '0') == '1' else ['-O3']
    return optimisation + ['-std=c++20'] + vector_isa_flags(os.environ)


def nvcc_flags():
    # -lineinfo: profilers and compute-sanitizer point at source lines, at no cost in speed.
    return ['-O3', '-std=c++20', '-lineinfo']


def extension():
    sources = sorted(glob.glob(os.path.join(CSRC, '*.cpp')) +
                     glob.glob(os.path.join(CSRC, 'cpu', '*.cpp')))
    # -fopenmp: at::parallel_for is an OpenMP loop compiled into the caller, so without it
    # the CPU passes run on one thread (2-core EPYC, c3 scope 4: the scope-column scatter took
    # 24 ms a forward, the same as with 1 thread). The extension then needs libgomp.so.1,
    # which resolves to the copy PyTorch has already loaded, so both share one thread pool.
    compile_flags = cxx_flags() + ['-fopenmp']
    link_flags = ['-fopenmp']
    check_toolchain(cuda=use_cuda())
    if not use_cuda():
        return CppExtension('dk_ops._C', sources, extra_compile_args={'cxx': compile_flags},
                            extra_link_args=link_flags)
    archs = cuda_arch_list(os.environ, torch.cuda.is_available())
    if archs is not None:
        os.environ['TORCH_CUDA_ARCH_LIST'] = archs
        print(f'dk_ops: building the CUDA kernels for TORCH_CUDA_ARCH_LIST="{archs}"')
    sources += sorted(glob.glob(os.path.join(CSRC, 'cuda', '*.cu')) +
                      glob.glob(os.path.join(CSRC, 'cuda', '*.cpp')))
    return CUDAExtension('dk_ops._C', sources, define_macros=[('WITH_CUDA', None)],
                         extra_compile_args={'cxx': compile_flags, 'nvcc': nvcc_flags()},
                         extra_link_args=link_flags)


EMULATED_CUDA = 'dk_ops._C_emulated_cuda'


def builds_emulated_cuda(environ, inplace: bool) -> bool:
    return inplace or environ.get('DK_OPS_EMULATED_CUDA', '0') == '1'


def emulated_cuda_extension():
    source = os.path.join(CSRC, 'emulated_cuda', 'deform_kernel_conv2d_emulated_cuda.cpp')
    # The files it includes, so that setuptools rebuilds it when a kernel changes.
    included = sorted(glob.glob(os.path.join(CSRC, '*.h')) +
                      glob.glob(os.path.join(CSRC, 'cuda', '*.cu*')) +
                      glob.glob(os.path.join(CSRC, 'emulated_cuda', '*.h')))
    # $ORIGIN: the loader finds dk_ops._C beside this library, and reuses the copy that
    # `import dk_ops` has loaded (one registration of the ops, one driver).
    return CppExtension(EMULATED_CUDA, [source], depends=included,
                        extra_compile_args={'cxx': cxx_flags()},
                        extra_link_args=['-Wl,-rpath,$ORIGIN'])


class BuildExtensions(BuildExtension):
    """Builds dk_ops._C_emulated_cuda only where builds_emulated_cuda says, and links it to the
    dk_ops._C just built (the extensions build in order)."""

    def finalize_options(self):
        super().finalize_options()
        if not builds_emulated_cuda(os.environ, self.inplace):
            self.extensions = [ext for ext in self.extensions if ext.name != EMULATED_CUDA]

    def build_extension(self, ext):
        if ext.name == EMULATED_CUDA:
            main = self.get_ext_fullpath('dk_ops._C')
            ext.library_dirs.append(os.path.dirname(main))
            ext.extra_link_args.append('-l:' + os.path.basename(main))
        super().build_extension(ext)


if __name__ == '__main__':
    setup(
        name='deformable-kernels',
        version='0.1.0',
        description='Deformable Kernels (Gao et al., ICLR 2020): a compiled PyTorch operator '
        'and its MMDetection integration',
        packages=find_packages(include=['dk_ops', 'dk_ops.*', 'dk_mmdet', 'dk_mmdet.*']),
        python_requires='>=3.9',
        install_requires=['torch>=2.4'],
        ext_modules=[extension(), emulated_cuda_extension()],
        cmdclass={'build_ext': BuildExtensions},
        zip_safe=False,
    )
