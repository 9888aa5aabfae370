// Host stand-ins for the CUDA constructs of deform_kernel_conv2d_cuda.cu, so that the same
// kernel source compiles with a host C++ compiler and runs on CPU tensors in `make test`.
// Included by that file, in place of the CUDA headers, when DK_EMULATED_CUDA is defined
// (only by emulated_cuda/deform_kernel_conv2d_emulated_cuda.cpp).
//
// What runs as on a GPU:
//   - A launch (DK_LAUNCH) runs every thread of the grid with the blockIdx, threadIdx, blockDim
//     and gridDim it would have there, so the kernels' index arithmetic and grid-stride loops
//     are the GPU's.
//   - The threads of a block are fibers (ucontext). A fiber runs until it reaches a barrier,
//     yields, and goes on once every thread the barrier waits for has reached it:
//       __shfl_down_sync  the 32 lanes of its warp; each lane then receives the value of
//                         lane + delta (its own where that is past lane 31, as on a GPU);
//       __syncthreads     every thread of the block.
//     Barriers need threads that have not run yet, so threads cannot simply run one after the
//     other; one OS thread per GPU thread would need a barrier of 256 OS threads; rewriting the
//     reductions and tiles as loops over threads would test a copy, not the kernel. A barrier
//     that some of the threads it waits for end without reaching (a non-uniform warp_sum or
//     __syncthreads, undefined on a GPU) raises, and so does a block whose threads all wait at
//     barriers that cannot be passed (some lanes of a warp at a shuffle, others at
//     __syncthreads).
//   - __shared__ variables: one copy per running block, seen by all its threads (see below).
//     Each thread runs as far as it can before it yields, so a thread that reads shared memory
//     before the __syncthreads that should order it after the other threads' writes reads
//     what they have not written yet, and the result shows it.
// What does not:
//   - Concurrency: blocks run one after another and the threads of a block in a fixed order
//     between barriers, so races that this order does not expose cannot show. atomicAdd is a
//     plain read-add-write: exact here, as one thread runs at a time and a thread is switched
//     out only at a barrier; the order of the adds is fixed, where a GPU's is not.
//   - The GPU's memory model (a write is seen by every later read, fences or not), the initial
//     contents of shared memory (here what the previous block of the launch left there, zeros
//     for the first), timing, and nvcc's arithmetic (it contracts a * b + c into fused
//     multiply-adds; g++ on x86-64 does not), so float32 results differ from a GPU's in the
//     last bits.
//   - Streams, device guards, launch bounds and launch errors: no-ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <ucontext.h>

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __grid_constant__
#define __launch_bounds__(...)
// Blocks run one at a time on the OS thread that launches them, all the fibers of a block on
// that OS thread, and a block's fibers all end before the next block starts: so a
// function-local `static thread_local` is one copy per running block, shared by its threads,
// reused by the next block (whose shared memory starts undefined on a GPU too), and separate
// for launches from two OS threads at once.
#define __shared__ static thread_local

namespace dk_ops::emulated_cuda {

struct Dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

}  // namespace dk_ops::emulated_cuda

// CUDA's built-in index variables; a launch sets them for the thread it runs.
inline thread_local dk_ops::emulated_cuda::Dim3 blockIdx, threadIdx, blockDim, gridDim;

namespace dk_ops::emulated_cuda {

constexpr int kLanes = 32;
constexpr int kMaxThreadsPerBlock = 1024;
// Room for a thread's frames: the kernels need a few KiB, an exception thrown in one more.
// A launch of 256-thread blocks allocates 16 MiB of stacks, reused by each of its blocks.
constexpr size_t kThreadStackBytes = size_t{64} << 10;

// The threads of the block being run, each a fiber, and the scheduler that steps them.
class Block {
 public:
  enum class Thread { kReady, kAtShuffle, kAtSyncthreads, kDone };

  explicit Block(int threads) : threads_(threads), stacks_(threads), contexts_(threads),
                                state_(threads), offered_(threads), received_(threads),
                                source_(threads) {
    for (auto& stack : stacks_) stack = std::make_unique_for_overwrite<char[]>(kThreadStackBytes);
  }

  // Runs `body` as every thread of the block (the caller sets blockIdx).
  void run(const std::function<void()>& body) {
    body_ = &body;
    error_ = nullptr;
    for (int thread = 0; thread < threads_; ++thread) {
      ucontext_t& context = contexts_[thread];
      getcontext(&context);
      context.uc_stack.ss_sp = stacks_[thread].get();
      context.uc_stack.ss_size = kThreadStackBytes;
      context.uc_link = &scheduler_;  // where the fiber goes when thread_main returns
      makecontext(&context, &Block::thread_main, 0);
      state_[thread] = Thread::kReady;
    }
    const Running running(this);
    // One step: every ready thread runs to its next barrier or to its end; then the barriers
    // that all their threads have reached let them go on.
    do {
      for (int thread = 0; thread < threads_; ++thread) {
        if (state_[thread] != Thread::kReady) continue;
        running_ = thread;
        threadIdx.x = thread;
        swapcontext(&scheduler_, &contexts_[thread]);
        if (error_) std::rethrow_exception(error_);
      }
    } while (release_barriers());
  }

  // Called by the running thread: offers `value`, yields until every lane of its warp has
  // offered its own, and returns that of lane + delta.
  double shuffle_down(double value, unsigned int delta) {
    const int thread = running_, lane = thread % kLanes;
    offered_[thread] = value;
    source_[thread] = lane + delta < unsigned{kLanes} ? thread + delta : thread;
    wait(Thread::kAtShuffle);
    return received_[thread];
  }

  // Called by the running thread: yields until every thread of the block has called it.
  void syncthreads() { wait(Thread::kAtSyncthreads); }

  static Block& current() {
    TORCH_CHECK(current_ != nullptr, "emulated CUDA: a block primitive outside a kernel launch");
    return *current_;
  }

 private:
  // Makes a block the one that the barriers and thread_main act on, while it runs.
  struct Running {
    explicit Running(Block* block) { current_ = block; }
    ~Running() { current_ = nullptr; }
  };

  static void thread_main() {
    Block& block = *current_;
    try {
      (*block.body_)();
    } catch (...) {  // an exception must not leave the fiber's stack: the scheduler rethrows it
      block.error_ = std::current_exception();
    }
    block.state_[block.running_] = Thread::kDone;
  }

  void wait(Thread barrier) {
    state_[running_] = barrier;
    swapcontext(&contexts_[running_], &scheduler_);
  }

  int count(Thread state, int begin, int end) const {
    int found = 0;
    for (int thread = begin; thread < end; ++thread) found += state_[thread] == state;
    return found;
  }

  // After a step: lets the threads through every barrier that all of its threads have
  // reached. False when every thread has ended; raises when the threads that wait can never
  // go on.
  bool release_barriers() {
    const int done = count(Thread::kDone, 0, threads_);
    if (done == threads_) return false;
    bool released = false;
    for (int first = 0; first < threads_; first += kLanes) {
      const int at_shuffle = count(Thread::kAtShuffle, first, first + kLanes);
      if (at_shuffle == 0) continue;
      const int warp_done = count(Thread::kDone, first, first + kLanes);
      TORCH_CHECK(warp_done == 0, "emulated CUDA: ", warp_done, " lanes of the warp of threads ",
                  first, "-", first + kLanes - 1, " of block ", blockIdx.x, " ended while ",
                  at_shuffle, " wait at __shfl_down_sync (a shuffle not every lane reaches)");
      if (at_shuffle < kLanes) continue;
      for (int thread = first; thread < first + kLanes; ++thread) {
        received_[thread] = offered_[source_[thread]];
        state_[thread] = Thread::kReady;
      }
      released = true;
    }
    const int at_syncthreads = count(Thread::kAtSyncthreads, 0, threads_);
    if (at_syncthreads > 0) {
      TORCH_CHECK(done == 0, "emulated CUDA: ", done, " threads of block ", blockIdx.x,
                  " ended while ", at_syncthreads,
                  " wait at __syncthreads (a barrier not every thread reaches)");
      if (at_syncthreads == threads_) {
        for (auto& state : state_) state = Thread::kReady;
        released = true;
      }
    }
    TORCH_CHECK(released, "emulated CUDA: no thread of block ", blockIdx.x, " can go on: ",
                at_syncthreads, " wait at __syncthreads, the others at __shfl_down_sync with "
                "lanes of their warp at __syncthreads");
    return true;
  }

  static inline thread_local Block* current_ = nullptr;

  const int threads_;
  const std::function<void()>* body_ = nullptr;
  std::exception_ptr error_;
  ucontext_t scheduler_;
  std::vector<std::unique_ptr<char[]>> stacks_;
  std::vector<ucontext_t> contexts_;
  std::vector<Thread> state_;
  std::vector<double> offered_, received_;
  std::vector<int> source_;
  int running_ = 0;
};

// Runs `thread` as every thread of a grid of `blocks` blocks of `threads_per_block` threads,
// block after block.
inline void run_grid(int64_t blocks, int threads_per_block, const std::function<void()>& thread) {
  TORCH_CHECK(blocks >= 1 && threads_per_block >= kLanes && threads_per_block % kLanes == 0 &&
                  threads_per_block <= kMaxThreadsPerBlock,
              "emulated CUDA: launch of ", blocks, " blocks of ", threads_per_block,
              " threads; whole warps only, at most ", kMaxThreadsPerBlock, " threads");
  gridDim = {static_cast<unsigned int>(blocks), 1, 1};
  blockDim = {static_cast<unsigned int>(threads_per_block), 1, 1};
  Block block(threads_per_block);
  for (int64_t index = 0; index < blocks; ++index) {
    blockIdx = {static_cast<unsigned int>(index), 0, 0};
    block.run(thread);
  }
}

struct Stream {};

// The launches of this process so far, for the tests that count a layer's; and whether they
// run, so that a test can count the launches of a problem too large to emulate.
struct Launches {
  std::atomic<int64_t> count{0};
  std::atomic<bool> run{true};
};
inline Launches launches;

// DK_LAUNCH(kernel, blocks, threads, stream)(args...): the host form of
// kernel<<<blocks, threads, 0, stream>>>(args...).
template <typename... Params>
auto launch(void (*kernel)(Params...), int64_t blocks, int threads_per_block, Stream) {
  return [=](auto&&... args) {
    ++launches.count;
    if (!launches.run) return;
    run_grid(blocks, threads_per_block, [&] { kernel(args...); });
  };
}

}  // namespace dk_ops::emulated_cuda

#define DK_LAUNCH(kernel, blocks, threads, stream) \
  ::dk_ops::emulated_cuda::launch(kernel, blocks, threads, stream)

template <typename T>
T __shfl_down_sync(unsigned int mask, T value, unsigned int delta, int width = 32) {
  static_assert(std::is_floating_point_v<T>, "emulated CUDA: shuffles of float and double only");
  TORCH_CHECK(mask == 0xffffffffu && width == dk_ops::emulated_cuda::kLanes,
              "emulated CUDA: full-warp shuffles only, got mask ", mask, " and width ", width);
  // A float travels exactly as a double.
  return static_cast<T>(dk_ops::emulated_cuda::Block::current().shuffle_down(value, delta));
}

inline void __syncthreads() { dk_ops::emulated_cuda::Block::current().syncthreads(); }

template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

// The stream, guard and launch check of the launchers (CPU tensors need none of them).
namespace c10::cuda {
inline dk_ops::emulated_cuda::Stream getCurrentCUDAStream() { return {}; }
struct OptionalCUDAGuard {
  explicit OptionalCUDAGuard(const std::optional<c10::Device>&) {}
};
}  // namespace c10::cuda
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
