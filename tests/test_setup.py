"""What setup.py decides before it compiles anything: the CUDA architectures without a GPU, the
toolchain it refuses in plain words, that the emulated CUDA extension is for the tests only, and
the vector ISA switch.

setup.py is loaded as a module under another name, so its `setup()` call does not run."""
import importlib.util
import pathlib

import pytest

SETUP_PY = pathlib.Path(__file__).resolve().parents[1] / 'setup.py'


@pytest.fixture(scope='module')
def setup_py():
    spec = importlib.util.spec_from_file_location('dk_ops_setup', SETUP_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_force_cuda_without_a_gpu_or_arch_list_builds_the_default_list(setup_py):
    archs = setup_py.cuda_arch_list({'FORCE_CUDA': '1'}, gpu_visible=False)
    assert archs == setup_py.DEFAULT_CUDA_ARCHS
    assert archs.endswith('+PTX')
    # torch takes it as is: one architecture per entry, the newest last with its PTX.
    entries = archs.split(';')
    assert all(float(entry.removesuffix('+PTX')) >= 7.5 for entry in entries)
    assert max(entries, key=lambda entry: float(entry.removesuffix('+PTX'))) == entries[-1]


def test_a_given_arch_list_or_a_visible_gpu_is_left_to_torch(setup_py):
    assert setup_py.cuda_arch_list({'TORCH_CUDA_ARCH_LIST': '9.0'}, gpu_visible=False) == '9.0'
    assert setup_py.cuda_arch_list({'TORCH_CUDA_ARCH_LIST': '9.0'}, gpu_visible=True) == '9.0'
    assert setup_py.cuda_arch_list({}, gpu_visible=True) is None


def test_the_default_list_is_one_torch_accepts(setup_py, monkeypatch):
    """torch's own parser turns the list into nvcc flags: a binary for each architecture and
    PTX for the last (without the list it raises IndexError where no GPU is visible)."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags
    monkeypatch.setenv('TORCH_CUDA_ARCH_LIST', setup_py.DEFAULT_CUDA_ARCHS)
    flags = _get_cuda_arch_flags()
    assert '-gencode=arch=compute_90,code=compute_90' in flags
    for arch in ('75', '80', '90'):
        assert f'-gencode=arch=compute_{arch},code=sm_{arch}' in flags


@pytest.mark.parametrize('cuda, gcc, words', [
    ('11.8', '12.2.0', ['CUDA 11.8 is too old', 'C++20', 'CUDA 12.0']),
    ('13.0', '9.4.0', ['g++ 9.4.0 is too old', 'C++20', 'version 10']),
    (None, '9.4.0', ['g++ 9.4.0 is too old']),
])
def test_too_old_a_toolchain_is_named_in_plain_words(setup_py, cuda, gcc, words):
    problems = setup_py.toolchain_problems(cuda, gcc)
    assert len(problems) == 1
    for word in words:
        assert word in problems[0]


@pytest.mark.parametrize('cuda, gcc', [('12.0', '10'), ('13.0', '12.2.0'), (None, None),
                                       ('12.4', None)])
def test_a_recent_enough_toolchain_passes(setup_py, cuda, gcc):
    assert setup_py.toolchain_problems(cuda, gcc) == []


def test_this_machines_compiler_is_read_as_gcc(setup_py):
    version = setup_py.gcc_version('g++')
    assert version is not None and setup_py.version_tuple(version)[0] >= setup_py.OLDEST_GCC
    assert setup_py.gcc_version('no-such-compiler-here') is None


def test_the_emulated_cuda_extension_is_built_in_place_or_on_request_only(setup_py):
    assert not setup_py.builds_emulated_cuda({}, inplace=False)
    assert not setup_py.builds_emulated_cuda({'DK_OPS_EMULATED_CUDA': '0'}, inplace=False)
    assert setup_py.builds_emulated_cuda({'DK_OPS_EMULATED_CUDA': '1'}, inplace=False)
    assert setup_py.builds_emulated_cuda({}, inplace=True)


@pytest.mark.parametrize('arguments, built', [
    (['build_ext'], ['dk_ops._C']),
    (['bdist_wheel'], ['dk_ops._C']),
    (['build_ext', '--inplace'], ['dk_ops._C', 'dk_ops._C_emulated_cuda']),
])
def test_which_extensions_a_build_compiles(arguments, built, monkeypatch):
    import setuptools  # noqa: F401  (its distutils)
    from distutils.core import run_setup
    monkeypatch.delenv('DK_OPS_EMULATED_CUDA', raising=False)
    monkeypatch.delenv('FORCE_CUDA', raising=False)
    monkeypatch.chdir(SETUP_PY.parent)
    distribution = run_setup(str(SETUP_PY), script_args=arguments, stop_after='commandline')
    build_ext = distribution.get_command_obj('build_ext')
    build_ext.ensure_finalized()
    assert [extension.name for extension in build_ext.extensions] == built


def test_nvcc_gets_lineinfo(setup_py):
    assert '-lineinfo' in setup_py.nvcc_flags()


def test_each_vector_isa_is_a_macro_that_vector_clones_reads(setup_py):
    header = (SETUP_PY.parent / 'dk_ops' / 'csrc' / 'cpu' / 'vector_clones.h').read_text()
    assert setup_py.vector_isa_flags({}) == []
    for isa in ('x86-64', 'x86-64-v3'):
        [flag] = setup_py.vector_isa_flags({'DK_OPS_VECTOR_ISA': isa})
        assert f'defined({flag.removeprefix("-D")})' in header


def test_an_unknown_vector_isa_is_refused_by_name(setup_py):
    with pytest.raises(SystemExit, match=r"DK_OPS_VECTOR_ISA must be one of .*got 'avx2'"):
        setup_py.vector_isa_flags({'DK_OPS_VECTOR_ISA': 'avx2'})
