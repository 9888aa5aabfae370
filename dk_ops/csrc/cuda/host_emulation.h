// Host stand-ins for the CUDA constructs of deform_kernel_conv2d_cuda.cu, so that the same
// kernel source compiles with a host C++ compiler and runs on CPU tensors in `make test`.
// Included by that file, in place of the CUDA headers, when DK_HOST_EMULATION is defined
// (only by host_cuda/deform_kernel_conv2d_host_cuda.cpp).
//
// What runs as on a GPU:
//   - A launch (DK_LAUNCH) runs every thread of the grid with the blockIdx, threadIdx, blockDim
//     and gridDim it would have there, so the kernels' index arithmetic and grid-stride loops
//     are the GPU's.
//   - The 32 lanes of a warp run in lock-step at each __shfl_down_sync: each lane is a fiber
//     (ucontext) that runs until its next shuffle, offers its value and yields; once all 32 wait
//     at the shuffle, every lane receives the value of lane + delta (its own where that is past
//     lane 31, as on a GPU) and they go on. A shuffle needs the values of lanes that have not
//     run yet, so lanes cannot simply run one after the other; one OS thread per lane would
//     need a 32-thread barrier per shuffle; rewriting the reductions as loops over lanes would
//     test a copy, not the kernel. A shuffle that some lanes of the warp never reach (a
//     non-uniform warp_sum, undefined on a GPU) raises.
// What does not:
//   - Concurrency: blocks run one after another, each warp after the previous one, and the
//     lanes of a warp in a fixed order, so races between threads cannot show. atomicAdd is a
//     plain read-add-write: exact here, as one lane runs at a time and a lane is switched out
//     only at a shuffle; the order of the adds is fixed, where a GPU's is not.
//   - The GPU's memory model, shared memory and __syncthreads (the kernels use none), timing,
//     and nvcc's arithmetic (it contracts a * b + c into fused multiply-adds; g++ on x86-64
//     does not), so float32 results differ from a GPU's in the last bits.
//   - Streams, device guards and launch errors: no-ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <ucontext.h>

#include <array>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <type_traits>

#define __global__
#define __device__
#define __grid_constant__

namespace dk_ops::host_emulation {

struct Dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

}  // namespace dk_ops::host_emulation

// CUDA's built-in index variables; a launch sets them for the thread it runs.
inline thread_local dk_ops::host_emulation::Dim3 blockIdx, threadIdx, blockDim, gridDim;

namespace dk_ops::host_emulation {

constexpr int kLanes = 32;
// Room for a lane's frames: the kernels need a few KiB, an exception thrown in one more.
constexpr size_t kLaneStackBytes = size_t{256} << 10;

// The lanes of the warp being run, each a fiber, and the scheduler that steps them.
class Warp {
 public:
  enum class Lane { kReady, kAtShuffle, kDone };

  Warp() {
    for (auto& stack : stacks_) stack = std::make_unique_for_overwrite<char[]>(kLaneStackBytes);
  }

  // Runs `body` as each of the 32 lanes whose first thread index in the block is `first`.
  void run(unsigned int first, const std::function<void()>& body) {
    body_ = &body;
    error_ = nullptr;
    for (int lane = 0; lane < kLanes; ++lane) {
      ucontext_t& context = lanes_[lane];
      getcontext(&context);
      context.uc_stack.ss_sp = stacks_[lane].get();
      context.uc_stack.ss_size = kLaneStackBytes;
      context.uc_link = &scheduler_;  // where the fiber goes when lane_main returns
      makecontext(&context, &Warp::lane_main, 0);
      state_[lane] = Lane::kReady;
    }
    const Running running(this);
    // One step: every lane not done runs to its next shuffle or to its end.
    for (;;) {
      int waiting = 0, done = 0;
      for (int lane = 0; lane < kLanes; ++lane) {
        if (state_[lane] == Lane::kDone) continue;
        running_ = lane;
        threadIdx.x = first + lane;
        swapcontext(&scheduler_, &lanes_[lane]);
        if (error_) std::rethrow_exception(error_);
      }
      for (const Lane state : state_) {
        waiting += state == Lane::kAtShuffle;
        done += state == Lane::kDone;
      }
      if (done == kLanes) break;
      TORCH_CHECK(waiting == kLanes, "host emulation: ", done, " lanes of the warp of threads ",
                  first, "-", first + kLanes - 1, " ended while ", waiting,
                  " wait at __shfl_down_sync (a shuffle not every lane reaches)");
      for (int lane = 0; lane < kLanes; ++lane) {
        received_[lane] = offered_[source_[lane]];
        state_[lane] = Lane::kReady;
      }
    }
  }

  // Called by the running lane: offers `value`, yields until every lane has offered its own,
  // and returns that of lane + delta.
  double shuffle_down(double value, unsigned int delta) {
    const int lane = running_;
    offered_[lane] = value;
    source_[lane] = lane + delta < unsigned{kLanes} ? lane + delta : lane;
    state_[lane] = Lane::kAtShuffle;
    swapcontext(&lanes_[lane], &scheduler_);
    return received_[lane];
  }

  static Warp& current() {
    TORCH_CHECK(current_ != nullptr, "host emulation: a warp primitive outside a kernel launch");
    return *current_;
  }

 private:
  // Makes a warp the one that shuffles and lane_main run, while it runs.
  struct Running {
    explicit Running(Warp* warp) { current_ = warp; }
    ~Running() { current_ = nullptr; }
  };

  static void lane_main() {
    Warp& warp = *current_;
    try {
      (*warp.body_)();
    } catch (...) {  // an exception must not leave the fiber's stack: the scheduler rethrows it
      warp.error_ = std::current_exception();
    }
    warp.state_[warp.running_] = Lane::kDone;
  }

  static inline thread_local Warp* current_ = nullptr;

  const std::function<void()>* body_ = nullptr;
  std::exception_ptr error_;
  ucontext_t scheduler_;
  std::array<ucontext_t, kLanes> lanes_;
  std::array<std::unique_ptr<char[]>, kLanes> stacks_;
  std::array<Lane, kLanes> state_;
  std::array<double, kLanes> offered_, received_;
  std::array<int, kLanes> source_;
  int running_ = 0;
};

// Runs `thread` as every thread of a grid of `blocks` blocks of `threads_per_block` threads:
// block after block, warp after warp.
inline void run_grid(int64_t blocks, int threads_per_block, const std::function<void()>& thread) {
  TORCH_CHECK(blocks >= 1 && threads_per_block >= kLanes && threads_per_block % kLanes == 0,
              "host emulation: launch of ", blocks, " blocks of ", threads_per_block,
              " threads; whole warps only");
  gridDim = {static_cast<unsigned int>(blocks), 1, 1};
  blockDim = {static_cast<unsigned int>(threads_per_block), 1, 1};
  Warp warp;
  for (int64_t block = 0; block < blocks; ++block) {
    blockIdx = {static_cast<unsigned int>(block), 0, 0};
    for (int first = 0; first < threads_per_block; first += kLanes) warp.run(first, thread);
  }
}

struct Stream {};

// DK_LAUNCH(kernel, blocks, threads, stream)(args...): the host form of
// kernel<<<blocks, threads, 0, stream>>>(args...).
template <typename... Params>
auto launch(void (*kernel)(Params...), int64_t blocks, int threads_per_block, Stream) {
  return [=](auto&&... args) {
    run_grid(blocks, threads_per_block, [&] { kernel(args...); });
  };
}

}  // namespace dk_ops::host_emulation

#define DK_LAUNCH(kernel, blocks, threads, stream) \
  ::dk_ops::host_emulation::launch(kernel, blocks, threads, stream)

template <typename T>
T __shfl_down_sync(unsigned int mask, T value, unsigned int delta, int width = 32) {
  static_assert(std::is_floating_point_v<T>, "host emulation: shuffles of float and double only");
  TORCH_CHECK(mask == 0xffffffffu && width == dk_ops::host_emulation::kLanes,
              "host emulation: full-warp shuffles only, got mask ", mask, " and width ", width);
  // A float travels exactly as a double.
  return static_cast<T>(dk_ops::host_emulation::Warp::current().shuffle_down(value, delta));
}

template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

// The stream, guard and launch check of the launchers (CPU tensors need none of them).
namespace c10::cuda {
inline dk_ops::host_emulation::Stream getCurrentCUDAStream() { return {}; }
struct OptionalCUDAGuard {
  explicit OptionalCUDAGuard(const std::optional<c10::Device>&) {}
};
}  // namespace c10::cuda
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
