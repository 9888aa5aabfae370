"""Builds the dk_ops._C extension and installs the dk_ops and dk_mmdet packages.

A CppExtension by default; a CUDAExtension (adding csrc/cuda/*.cu) when CUDA is available
or FORCE_CUDA=1, so GPU builds also work on machines without a GPU. TORCH_CUDA_ARCH_LIST
picks the architectures, as for any torch extension.

A second extension, dk_ops._C_emulated_cuda, is always built: the CUDA kernels compiled for
host threads (csrc/emulated_cuda/), which the tests run on a CPU. It links to dk_ops._C, whose
driver it calls.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join('dk_ops', 'csrc')


def use_cuda() -> bool:
    if os.environ.get('FORCE_CUDA', '0') == '1':
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def cxx_flags():
    optimisation = ['-O0', '-g'] if os.environ.get('DEBUG', '0') == '1' else ['-O3']
    return optimisation + ['-std=c++20']


def extension():
    sources = sorted(glob.glob(os.path.join(CSRC, '*.cpp')) +
                     glob.glob(os.path.join(CSRC, 'cpu', '*.cpp')))
    # -fopenmp: at::parallel_for is an OpenMP loop compiled into the caller, so without it
    # the CPU passes run on one thread (2-core EPYC, c3 scope 4: the scope-column scatter took
    # 24 ms a forward, the same as with 1 thread). The extension then needs libgomp.so.1,
    # which resolves to the copy PyTorch has already loaded, so both share one thread pool.
    compile_flags = cxx_flags() + ['-fopenmp']
    link_flags = ['-fopenmp']
    if not use_cuda():
        return CppExtension('dk_ops._C', sources, extra_compile_args={'cxx': compile_flags},
                            extra_link_args=link_flags)
    sources += sorted(glob.glob(os.path.join(CSRC, 'cuda', '*.cu')) +
                      glob.glob(os.path.join(CSRC, 'cuda', '*.cpp')))
    return CUDAExtension('dk_ops._C', sources, define_macros=[('WITH_CUDA', None)],
                         extra_compile_args={'cxx': compile_flags,
                                             'nvcc': ['-O3', '-std=c++20']},
                         extra_link_args=link_flags)


EMULATED_CUDA = 'dk_ops._C_emulated_cuda'


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
    """Links dk_ops._C_emulated_cuda to the dk_ops._C just built (the extensions build in
    order)."""

    def build_extension(self, ext):
        if ext.name == EMULATED_CUDA:
            main = self.get_ext_fullpath('dk_ops._C')
            ext.library_dirs.append(os.path.dirname(main))
            ext.extra_link_args.append('-l:' + os.path.basename(main))
        super().build_extension(ext)


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
