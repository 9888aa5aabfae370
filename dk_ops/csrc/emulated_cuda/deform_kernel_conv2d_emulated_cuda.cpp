// dk_ops._C_emulated_cuda: the CUDA kernels of cuda/deform_kernel_conv2d_cuda.cu compiled for
// host threads (emulated_cuda.h), so that the tests run the GPU's kernel source on a CPU. It links
// to dk_ops._C and calls its shared driver, as the CUDA build does. Its ops,
// torch.ops.dk_ops_emulated_cuda.*, take CPU tensors; torch.ops.dk_ops is left as it is.
#include <Python.h>

#include <string>

#define DK_EMULATED_CUDA
#include "../cuda/deform_kernel_conv2d_cuda.cu"

// Kernels that check the emulation itself (tests/test_op_cuda_implicit_gemm.py), each launched
// as 2 blocks of 64 threads by emulation_self_test(name).
namespace dk_ops::emulated_cuda {
namespace {

constexpr int kSelfTestBlocks = 2, kSelfTestThreads = 64;

// out[thread] = the global index of the next thread of its block, passed through shared
// memory: right only if __syncthreads orders the reads after every thread's write.
__global__ void rotate_through_shared(float* out) {
  __shared__ float values[kSelfTestThreads];
  const unsigned int global = blockIdx.x * blockDim.x + threadIdx.x;
  values[threadIdx.x] = static_cast<float>(global);
  __syncthreads();
  out[global] = values[(threadIdx.x + 1) % blockDim.x];
}

// Thread 0 ends, the others wait for it at __syncthreads.
__global__ void barrier_after_early_exit(float*) {
  if (threadIdx.x == 0) return;
  __syncthreads();
}

// Half of warp 0 waits at a shuffle, the rest of the block at __syncthreads.
__global__ void shuffle_against_barrier(float* out) {
  if (threadIdx.x < kLanes / 2) {
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
  } else {
    __syncthreads();
  }
}

at::Tensor emulation_self_test(std::string kernel) {
  auto out = at::zeros({kSelfTestBlocks * kSelfTestThreads}, at::kFloat);
  auto run = [&](void (*launched)(float*)) {
    DK_LAUNCH(launched, kSelfTestBlocks, kSelfTestThreads, Stream{})(out.data_ptr<float>());
  };
  if (kernel == "rotate_through_shared") {
    run(rotate_through_shared);
  } else if (kernel == "barrier_after_early_exit") {
    run(barrier_after_early_exit);
  } else if (kernel == "shuffle_against_barrier") {
    run(shuffle_against_barrier);
  } else {
    TORCH_CHECK_VALUE(false, "emulation_self_test: no kernel named '", kernel, "'");
  }
  return out;
}

int64_t launch_count() { return launches.count; }

// run_launches(false): the launches that follow are counted and skipped (their outputs keep
// whatever their memory held) until run_launches(true).
void run_launches(bool run) { launches.run = run; }

}  // namespace
}  // namespace dk_ops::emulated_cuda

TORCH_LIBRARY_FRAGMENT(dk_ops_emulated_cuda, m) {
  m.def("emulation_self_test", TORCH_FN(dk_ops::emulated_cuda::emulation_self_test));
  m.def("launch_count", TORCH_FN(dk_ops::emulated_cuda::launch_count));
  m.def("run_launches", TORCH_FN(dk_ops::emulated_cuda::run_launches));
}

// `import dk_ops._C_emulated_cuda` loads this library (and so runs the registration of the ops);
// the Python module itself is empty.
extern "C" PyObject* PyInit__C_emulated_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_emulated_cuda", nullptr, -1,
                                      nullptr};
  return PyModule_Create(&module);
}
