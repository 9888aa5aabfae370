// dk_ops._C_emulated_cuda: the CUDA kernels of cuda/deform_kernel_conv2d_cuda.cu compiled for
// host threads (emulated_cuda.h), so that the tests run the GPU's kernel source on a CPU. It links
// to dk_ops._C and calls its shared driver, as the CUDA build does. Its ops,
// torch.ops.dk_ops_emulated_cuda.*, take CPU tensors; torch.ops.dk_ops is left as it is.
#include <Python.h>

#include <string>
#include <tuple>
#include <utility>

#define DK_EMULATED_CUDA
#include "../cuda/deform_kernel_conv2d_cuda.cu"

// Kernels that check the emulation itself (tests/test_emulated_cuda.py), each launched as 2 blocks
// of 64 threads by emulation_self_test(name). Some are wrong on purpose, with the hazards that
// the emulation must catch where a GPU would go wrong: they exist only in this test build.
namespace dk_ops::emulated_cuda {
namespace {

using cuda_kernels::first_thread;
using cuda_kernels::thread_stride;

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

// A planted race: out[thread] = the global index of the thread before it in its block (its own
// for thread 0), through shared memory without the __syncthreads between write and read.
__global__ void race_without_barrier(float* out) {
  __shared__ float values[kSelfTestThreads];
  const unsigned int global = blockIdx.x * blockDim.x + threadIdx.x;
  values[threadIdx.x] = static_cast<float>(global);
  out[global] = values[threadIdx.x > 0 ? threadIdx.x - 1 : 0];
}

// A planted read of uninitialised shared memory: only block 0 writes what every block reads.
__global__ void read_unwritten_shared(float* out) {
  __shared__ float values[kSelfTestThreads];
  const unsigned int global = blockIdx.x * blockDim.x + threadIdx.x;
  if (blockIdx.x == 0) values[threadIdx.x] = static_cast<float>(global);
  __syncthreads();
  out[global] = values[threadIdx.x];
}

// A planted out-of-bounds read: the last thread reads the float past the end of `out`.
__global__ void read_past_the_end(float* out) {
  const unsigned int global = blockIdx.x * blockDim.x + threadIdx.x;
  out[global] = out[global + 1];
}

// A grid-stride loop over the 128 entries of out: each gets 100 * gridDim.x + the block that
// wrote it.
__global__ void grid_stride_blocks(float* out) {
  for (int64_t index = first_thread(); index < kSelfTestBlocks * kSelfTestThreads;
       index += thread_stride()) {
    out[index] = static_cast<float>(100 * gridDim.x + blockIdx.x);
  }
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
  using Kernel = void (*)(float*);
  static const std::pair<const char*, Kernel> kKernels[] = {
      {"rotate_through_shared", rotate_through_shared},
      {"race_without_barrier", race_without_barrier},
      {"read_unwritten_shared", read_unwritten_shared},
      {"read_past_the_end", read_past_the_end},
      {"grid_stride_blocks", grid_stride_blocks},
      {"barrier_after_early_exit", barrier_after_early_exit},
      {"shuffle_against_barrier", shuffle_against_barrier},
  };
  for (const auto& [name, launched] : kKernels) {
    if (kernel != name) continue;
    auto out = at::zeros({kSelfTestBlocks * kSelfTestThreads}, at::kFloat);
    DK_LAUNCH(launched, kSelfTestBlocks, kSelfTestThreads, Stream{})(out.data_ptr<float>());
    return out;
  }
  TORCH_CHECK_VALUE(false, "emulation_self_test: no kernel named '", kernel, "'");
}

// The test hook of the schedule (emulated_cuda.h), and what it is.
void set_emulation_schedule(std::string thread_order, int64_t seed, int64_t max_blocks) {
  set_schedule({order_named(thread_order), static_cast<uint64_t>(seed), max_blocks});
}

std::tuple<std::string, int64_t, int64_t> emulation_schedule() {
  const Schedule schedule = current_schedule();
  return {order_name(schedule.order), static_cast<int64_t>(schedule.seed), schedule.max_blocks};
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
  m.def("set_emulation_schedule", TORCH_FN(dk_ops::emulated_cuda::set_emulation_schedule));
  m.def("emulation_schedule", TORCH_FN(dk_ops::emulated_cuda::emulation_schedule));
}

// `import dk_ops._C_emulated_cuda` loads this library (and so runs the registration of the ops);
// the Python module itself is empty.
extern "C" PyObject* PyInit__C_emulated_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_emulated_cuda", nullptr, -1,
                                      nullptr};
  return PyModule_Create(&module);
}
