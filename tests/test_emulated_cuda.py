"""The CUDA emulation itself (dk_ops/csrc/emulated_cuda/emulated_cuda.h): its block barriers order
shared memory, barriers that no launch could pass raise instead of hanging, and the hazards that a
GPU would turn into wrong results are caught: a race between the threads of a block shows in some
thread order, a read of shared memory that no thread wrote gives NaN, a grid-stride loop runs its
tails under a capped grid, and an out-of-bounds read is reported in the AddressSanitizer build
(`make test-asan`). Then the op's kernels, under every thread order and a capped grid, against the
float64 reference.

The emulation's own test kernels (dk_ops/csrc/emulated_cuda/deform_kernel_conv2d_emulated_cuda.cpp)
run as 2 blocks of 64 threads each; the planted hazards are theirs."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dk_ops._C_emulated_cuda
from dk_reference import Problem, problems_named
from emulated_cuda import (EMULATED_OPS, THREAD_ORDERS, assert_matches_reference,
                           emulation_schedule)
from op_comparison import TOLERANCE

BLOCKS, THREADS = 2, 64
# The global index of each thread of the self-test launches, by block.
GLOBAL_INDEX = torch.arange(BLOCKS * THREADS, dtype=torch.float32).view(BLOCKS, THREADS)


@pytest.mark.parametrize('thread_order', THREAD_ORDERS)
def test_syncthreads_orders_shared_memory(thread_order):
    # Each thread reads, through shared memory, the index its neighbour in the block wrote.
    with emulation_schedule(thread_order):
        out = EMULATED_OPS.emulation_self_test('rotate_through_shared')
    assert torch.equal(out, GLOBAL_INDEX.roll(-1, dims=1).flatten())


def race_without_barrier():
    """The planted race: each thread reads its predecessor's write without a barrier."""
    out = EMULATED_OPS.emulation_self_test('race_without_barrier')
    expected = (GLOBAL_INDEX - (torch.arange(THREADS) > 0).float()).flatten()
    return out, expected


def test_race_is_caught_in_the_orders_that_run_the_reader_first():
    # In forward order each writer runs before its reader, as one fixed order may by chance:
    # the race is hidden there, and the other orders are what reveal it.
    with emulation_schedule('forward'):
        out, expected = race_without_barrier()
    assert torch.equal(out, expected)
    with emulation_schedule('reversed'):
        out, expected = race_without_barrier()
    assert out.view(BLOCKS, THREADS)[:, 1:].isnan().all()
    for seed in range(3):
        with emulation_schedule('random', seed=seed):
            out, expected = race_without_barrier()
        assert out.isnan().any() and not torch.equal(out, expected), seed


def test_default_schedule_changes_the_order_from_launch_to_launch():
    with emulation_schedule('rotate'):
        results = [race_without_barrier() for _ in range(3)]
    caught = [out.isnan().any().item() for out, _ in results]
    assert caught == [False, True, True]  # forward, reversed, random


def test_random_orders_follow_their_seed():
    def order_of_the_race(seed):
        with emulation_schedule('random', seed=seed):
            return race_without_barrier()[0].isnan()

    assert torch.equal(order_of_the_race(5), order_of_the_race(5))
    assert not torch.equal(order_of_the_race(5), order_of_the_race(6))


@pytest.mark.parametrize('thread_order', THREAD_ORDERS)
def test_shared_memory_no_thread_wrote_reads_nan(thread_order):
    # Block 0 writes shared memory and reads it back; block 1 reads it without writing it, and
    # must not see what block 0 left there.
    with emulation_schedule(thread_order):
        out = EMULATED_OPS.emulation_self_test('read_unwritten_shared').view(BLOCKS, THREADS)
    assert torch.equal(out[0], GLOBAL_INDEX[0])
    assert out[1].isnan().all()


def test_shared_memory_is_the_only_thread_local_state():
    # The emulation fills the library's whole thread-local block with NaN when a block starts:
    # only function-local statics (the kernels' __shared__ variables, whose names the Itanium
    # mangling starts with _ZZ) may live there.
    readelf = shutil.which('readelf')
    assert readelf is not None, 'readelf (binutils, which builds the extension) is not on PATH'
    symbols = subprocess.run([readelf, '-sW', dk_ops._C_emulated_cuda.__file__], check=True,
                             capture_output=True, text=True).stdout
    thread_local = {fields[7] for fields in map(str.split, symbols.splitlines())
                    if len(fields) >= 8 and fields[3] == 'TLS'}
    assert thread_local and all(name.startswith('_ZZ') for name in thread_local), thread_local


@pytest.mark.parametrize('max_blocks,expected', [
    (0, [200.0] * THREADS + [201.0] * THREADS),  # both blocks, one entry per thread
    (1, [100.0] * 2 * THREADS),  # block 0 alone, two entries per thread
    (5, [200.0] * THREADS + [201.0] * THREADS),  # a cap above the grid changes nothing
])
def test_grid_cap_sends_the_threads_round_their_grid_stride_loops(max_blocks, expected):
    # Each entry records 100 * gridDim.x + the block that wrote it.
    with emulation_schedule('rotate', max_blocks=max_blocks):
        out = EMULATED_OPS.emulation_self_test('grid_stride_blocks')
    assert out.tolist() == expected


@pytest.mark.parametrize('arguments,message', [
    (('sideways', 0, 0), "thread order must be forward, reversed, random or rotate, got 'sideways'"),
    (('forward', 0, -1), 'max_blocks must be 0 \\(no cap\\) or more, got -1'),
])
def test_bad_schedule_is_refused_and_leaves_the_schedule(arguments, message):
    before = EMULATED_OPS.emulation_schedule()
    with pytest.raises(ValueError, match=message):
        EMULATED_OPS.set_emulation_schedule(*arguments)
    assert EMULATED_OPS.emulation_schedule() == before


def running_under_address_sanitizer():
    with open('/proc/self/maps') as maps:
        return 'libasan' in maps.read()


def test_out_of_bounds_read_is_reported_by_address_sanitizer():
    if not running_under_address_sanitizer():
        pytest.skip('needs the AddressSanitizer build and runtime: make test-asan')
    # The report aborts the process: the kernel runs in a child, with this one's environment
    # (the preloaded runtime, the sanitizer's options, the build on PYTHONPATH).
    tests = os.path.dirname(os.path.abspath(__file__))
    script = ('import sys; sys.path.insert(0, sys.argv[1]); from emulated_cuda import EMULATED_OPS; '
              "EMULATED_OPS.emulation_self_test('read_past_the_end')")
    child = subprocess.run([sys.executable, '-P', '-c', script, tests], capture_output=True,
                           text=True, timeout=300)
    assert child.returncode != 0
    assert 'ERROR: AddressSanitizer: heap-buffer-overflow' in child.stderr, child.stderr[-3000:]
    assert 'READ of size 4' in child.stderr and 'read_past_the_end' in child.stderr


@pytest.mark.parametrize('kernel,message', [
    ('barrier_after_early_exit',
     'emulated CUDA: 1 threads of block 0 ended while 63 wait at __syncthreads'),
    ('shuffle_against_barrier',
     'emulated CUDA: no thread of block 0 can go on: 48 wait at __syncthreads'),
])
def test_barriers_that_cannot_be_passed_raise(kernel, message):
    with pytest.raises(RuntimeError, match=message):
        EMULATED_OPS.emulation_self_test(kernel)


# One problem per group of kernels: the columns path with the rigid input gradient, with data
# offsets and masks (the atomic input gradient, the offset and mask gradients), the global path,
# and the implicit GEMMs, whose tiles every dimension of this problem cuts short (30 columns of
# 64, 66 output channels of 64, 6 input channels of 4, 25 scope cells of 16, or of 8 in float64).
IMPLICIT_GEMM_TAILS = Problem('implicit_gemm_tails', in_channels=6, out_channels=66,
                              input_size=(5, 6), scope_size=(5, 5), data_offset=True, mask=True)
HAZARD_PROBLEMS = [(problem, 'columns') for problem in problems_named(
    'k3_scope4_local', 'data_offset_mask_dgroups2_groups2', 'global_kgroups2')] + [
    (IMPLICIT_GEMM_TAILS, 'implicit_gemm')]


@pytest.mark.parametrize('thread_order', THREAD_ORDERS)
@pytest.mark.parametrize('problem,local_kernels', [
    pytest.param(problem, kernels, id=problem.name) for problem, kernels in HAZARD_PROBLEMS])
def test_op_kernels_match_reference_in_every_order_on_a_capped_grid(problem, local_kernels,
                                                                    thread_order, monkeypatch):
    # 3 blocks a launch: every kernel's grid-stride or tile loop goes round several times.
    monkeypatch.setenv('DK_OPS_LOCAL_KERNELS', local_kernels)
    with emulation_schedule(thread_order, seed=1, max_blocks=3):
        assert_matches_reference(problem, problem.make_inputs(), TOLERANCE[torch.float64])
