"""The CUDA emulation itself (dk_ops/csrc/emulated_cuda/emulated_cuda.h): its block barriers
order shared memory, and barriers that no launch could pass raise instead of hanging.

The implicit-GEMM kernels need __syncthreads (test_op_cuda_implicit_gemm.py fails when one is
left out); these run the emulation's own test kernels
(dk_ops/csrc/emulated_cuda/deform_kernel_conv2d_emulated_cuda.cpp), 2 blocks of 64 threads each."""
import pytest
import torch

from emulated_cuda import EMULATED_OPS


def test_syncthreads_orders_shared_memory():
    # Each thread reads, through shared memory, the index its neighbour in the block wrote.
    out = EMULATED_OPS.emulation_self_test('rotate_through_shared')
    index = torch.arange(128).view(2, 64)
    assert out.tolist() == (index.roll(-1, dims=1)).flatten().float().tolist()


@pytest.mark.parametrize('kernel,message', [
    ('barrier_after_early_exit',
     'emulated CUDA: 1 threads of block 0 ended while 63 wait at __syncthreads'),
    ('shuffle_against_barrier',
     'emulated CUDA: no thread of block 0 can go on: 48 wait at __syncthreads'),
])
def test_barriers_that_cannot_be_passed_raise(kernel, message):
    with pytest.raises(RuntimeError, match=message):
        EMULATED_OPS.emulation_self_test(kernel)
