// Host stand-ins for the CUDA constructs of deform_kernel_conv2d_cuda.cu, so that the same
// kernel source compiles with a host C++ compiler and runs on CPU tensors in `make test`.
// Included by that file, in place of the CUDA headers, when DK_EMULATED_CUDA is defined
// (only by emulated_cuda/deform_kernel_conv2d_emulated_cuda.cpp).
//
// What runs as on a GPU, and what is made to fail where a GPU may:
//   - A launch (DK_LAUNCH) runs every thread of the grid with the blockIdx, threadIdx, blockDim
//     and gridDim it would have there, so the kernels' index arithmetic and grid-stride loops
//     are the GPU's. The grid can be capped (Schedule::max_blocks), so that each thread goes
//     round its grid-stride loop several times and the loops' tails run.
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
//   - The order in which the threads of a block take their turns between barriers changes from
//     launch to launch (ThreadOrder: forward, reversed, seeded random), so a thread that reads
//     what another thread of its block writes, without a barrier between them, reads it before
//     it is written in some order, and the result shows it.
//   - __shared__ variables: one copy per running block, seen by all its threads, and filled
//     with NaN (all bits set) when the block starts: a read of shared memory that no thread of
//     the block has written gives NaN, as it gives garbage on a GPU.
//   - Out-of-bounds accesses to global memory: the AddressSanitizer build (`make test-asan`)
//     runs the same kernels; a fiber's switches are announced to it.
// What does not:
//   - Concurrency: blocks run one after another, one thread at a time, so a race shows only
//     through the orders above. atomicAdd is a plain read-add-write: exact here, as one thread
//     runs at a time and a thread is switched out only at a barrier.
//   - The GPU's memory model (a write is seen by every later read, fences or not), timing, and
//     nvcc's arithmetic (it contracts a * b + c into fused multiply-adds; g++ on x86-64 does
//     not), so float32 results differ from a GPU's in the last bits.
//   - Out-of-bounds accesses to shared memory: AddressSanitizer does not guard thread_local
//     variables (compute-sanitizer on a GPU does, tools/gpu_check.sh).
//   - Streams, device guards, launch bounds and launch errors: no-ops.
//
// Launches from several OS threads take turns (one launch lock), so the launch state below
// (blockIdx and the rest, the schedule) is process-wide.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>
#include <link.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __grid_constant__
#define __launch_bounds__(...)
// One copy per OS thread, and so per running block: blocks run one at a time on the OS thread
// that launches them, all the fibers of a block on that OS thread. Thread-local storage also
// makes the shared memory of every kernel one region that a block's start can fill (see
// shared_memory below).
#define __shared__ static thread_local

namespace dk_ops::emulated_cuda {

struct Dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

}  // namespace dk_ops::emulated_cuda

// CUDA's built-in index variables; a launch sets them for the thread it runs.
inline dk_ops::emulated_cuda::Dim3 blockIdx, threadIdx, blockDim, gridDim;

namespace dk_ops::emulated_cuda {

constexpr int kLanes = 32;
constexpr int kMaxThreadsPerBlock = 1024;
// Room for a thread's frames: the kernels need a few KiB, an exception thrown in one more, and
// AddressSanitizer's red zones about three times as much. A launch of 256-thread blocks
// allocates 16 MiB of stacks (64 MiB under AddressSanitizer), reused by each of its blocks.
#ifdef __SANITIZE_ADDRESS__
constexpr size_t kThreadStackBytes = size_t{256} << 10;
#else
constexpr size_t kThreadStackBytes = size_t{64} << 10;
#endif

// The order in which the threads of a block take their turns, each running to its next barrier.
// kRotate: forward, reversed and random in turn, launch after launch.
enum class ThreadOrder { kForward, kReversed, kRandom, kRotate };

// How the launches run: read from the environment (DK_EMULATED_CUDA_THREAD_ORDER = forward,
// reversed, random or rotate; DK_EMULATED_CUDA_SEED; DK_EMULATED_CUDA_MAX_BLOCKS) at the first
// launch, and set by the test hook set_schedule.
struct Schedule {
  ThreadOrder order = ThreadOrder::kRotate;
  uint64_t seed = 0;         // of the random orders
  int64_t max_blocks = 0;    // the most blocks a launch runs; 0: all that it asks for
};

inline const char* order_name(ThreadOrder order) {
  switch (order) {
    case ThreadOrder::kForward: return "forward";
    case ThreadOrder::kReversed: return "reversed";
    case ThreadOrder::kRandom: return "random";
    case ThreadOrder::kRotate: return "rotate";
  }
  return "?";
}

inline ThreadOrder order_named(const std::string& name) {
  for (auto order : {ThreadOrder::kForward, ThreadOrder::kReversed, ThreadOrder::kRandom,
                     ThreadOrder::kRotate}) {
    if (name == order_name(order)) return order;
  }
  TORCH_CHECK_VALUE(false, "emulated CUDA: thread order must be forward, reversed, random or "
                    "rotate, got '", name, "'");
}

inline Schedule schedule_from_environment() {
  Schedule schedule;
  if (const char* order = std::getenv("DK_EMULATED_CUDA_THREAD_ORDER")) {
    schedule.order = order_named(order);
  }
  if (const char* seed = std::getenv("DK_EMULATED_CUDA_SEED")) schedule.seed = std::stoull(seed);
  if (const char* blocks = std::getenv("DK_EMULATED_CUDA_MAX_BLOCKS")) {
    schedule.max_blocks = std::stoll(blocks);
    TORCH_CHECK_VALUE(schedule.max_blocks >= 0,
                      "emulated CUDA: DK_EMULATED_CUDA_MAX_BLOCKS must be 0 (no cap) or more, "
                      "got ", blocks);
  }
  return schedule;
}

// The launch lock, and what it guards: the schedule and the number of launches since it was set.
inline std::mutex launch_lock;
inline uint64_t launches_since_schedule = 0;

inline Schedule& active_schedule() {
  static Schedule schedule = schedule_from_environment();  // raises again until it can be read
  return schedule;
}

// The test hook: the schedule of the launches from now on, counted afresh from the first.
inline void set_schedule(const Schedule& next) {
  TORCH_CHECK_VALUE(next.max_blocks >= 0,
                    "emulated CUDA: max_blocks must be 0 (no cap) or more, got ", next.max_blocks);
  const std::lock_guard lock(launch_lock);
  active_schedule() = next;
  launches_since_schedule = 0;
}

inline Schedule current_schedule() {
  const std::lock_guard lock(launch_lock);
  return active_schedule();
}

// The shared memory of every kernel, as the calling OS thread sees it: this library's block of
// thread-local storage. __shared__ is its only thread-local state (the launch state is
// process-wide), which tests/test_emulated_cuda.py checks in the library's symbols.
inline std::span<unsigned char> shared_memory() {
  // The block exists in an OS thread once the thread has used a thread-local variable of the
  // library (volatile: a store that the compiler keeps).
  [[maybe_unused]] static thread_local volatile unsigned char first_use;
  first_use = 0;
  Dl_info library;
  TORCH_CHECK(dladdr(reinterpret_cast<void*>(&shared_memory), &library) != 0,
              "emulated CUDA: dladdr cannot find its own library");
  struct Found {
    const char* path;
    std::span<unsigned char> block;
  } found{library.dli_fname, {}};
  dl_iterate_phdr(
      [](dl_phdr_info* module, size_t, void* data) {
        auto& found = *static_cast<Found*>(data);
        if (module->dlpi_name == nullptr || std::strcmp(module->dlpi_name, found.path) != 0) {
          return 0;
        }
        for (int index = 0; index < module->dlpi_phnum; ++index) {
          if (module->dlpi_phdr[index].p_type == PT_TLS) {
            found.block = {static_cast<unsigned char*>(module->dlpi_tls_data),
                           module->dlpi_phdr[index].p_memsz};
          }
        }
        return 1;
      },
      &found);
  TORCH_CHECK(found.block.data() != nullptr,
              "emulated CUDA: no thread-local block of ", found.path, " in this OS thread");
  return found.block;
}

// AddressSanitizer, where the build has it, must hear of every switch of stacks; otherwise it
// takes the frames of one for overflows of the other.
#ifdef __SANITIZE_ADDRESS__
inline void leaving_stack(void** fake_stack, const void* bottom, size_t size) {
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
}
inline void entered_stack(void* fake_stack, const void** bottom_left, size_t* size_left) {
  __sanitizer_finish_switch_fiber(fake_stack, bottom_left, size_left);
}
#else
inline void leaving_stack(void**, const void*, size_t) {}
inline void entered_stack(void*, const void**, size_t*) {}
#endif

// The threads of the block being run, each a fiber, and the scheduler that steps them.
class Block {
 public:
  enum class Thread { kReady, kAtShuffle, kAtSyncthreads, kDone };

  explicit Block(int threads) : threads_(threads), stacks_(threads), contexts_(threads),
                                state_(threads), offered_(threads), received_(threads),
                                source_(threads) {
    for (auto& stack : stacks_) stack = std::make_unique_for_overwrite<char[]>(kThreadStackBytes);
  }

  // Runs `body` as every thread of the block (the caller sets blockIdx and fills the shared
  // memory), the ready threads of each step in the order of `turns`, a permutation of them.
  void run(const std::function<void()>& body, const std::vector<int>& turns) {
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
      for (const int thread : turns) {
        if (state_[thread] != Thread::kReady) continue;
        running_ = thread;
        threadIdx.x = thread;
        void* fake_stack = nullptr;
        leaving_stack(&fake_stack, stacks_[thread].get(), kThreadStackBytes);
        swapcontext(&scheduler_, &contexts_[thread]);
        entered_stack(fake_stack, nullptr, nullptr);
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
    entered_stack(nullptr, &block.scheduler_stack_, &block.scheduler_stack_bytes_);
    try {
      (*block.body_)();
    } catch (...) {  // an exception must not leave the fiber's stack: the scheduler rethrows it
      block.error_ = std::current_exception();
    }
    block.state_[block.running_] = Thread::kDone;
    // A null fake stack: the fiber's frames are gone for good.
    leaving_stack(nullptr, block.scheduler_stack_, block.scheduler_stack_bytes_);
  }

  void wait(Thread barrier) {
    state_[running_] = barrier;
    void* fake_stack = nullptr;
    leaving_stack(&fake_stack, scheduler_stack_, scheduler_stack_bytes_);
    swapcontext(&contexts_[running_], &scheduler_);
    entered_stack(fake_stack, &scheduler_stack_, &scheduler_stack_bytes_);
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

  static inline Block* current_ = nullptr;

  const int threads_;
  const std::function<void()>* body_ = nullptr;
  std::exception_ptr error_;
  ucontext_t scheduler_;
  const void* scheduler_stack_ = nullptr;  // the launching OS thread's stack, for the sanitizer
  size_t scheduler_stack_bytes_ = 0;
  std::vector<std::unique_ptr<char[]>> stacks_;
  std::vector<ucontext_t> contexts_;
  std::vector<Thread> state_;
  std::vector<double> offered_, received_;
  std::vector<int> source_;
  int running_ = 0;
};

// The order of the threads of block `block` of launch `launch` under `schedule`.
inline std::vector<int> thread_turns(const Schedule& schedule, uint64_t launch, int64_t block,
                                     int threads) {
  std::vector<int> turns(threads);
  std::iota(turns.begin(), turns.end(), 0);
  ThreadOrder order = schedule.order;
  if (order == ThreadOrder::kRotate) order = static_cast<ThreadOrder>(launch % 3);
  if (order == ThreadOrder::kReversed) std::reverse(turns.begin(), turns.end());
  if (order == ThreadOrder::kRandom) {
    std::seed_seq seed{static_cast<uint32_t>(schedule.seed), static_cast<uint32_t>(schedule.seed >> 32),
                       static_cast<uint32_t>(launch), static_cast<uint32_t>(block)};
    std::mt19937_64 generator(seed);
    std::shuffle(turns.begin(), turns.end(), generator);
  }
  return turns;
}

// Runs `thread` as every thread of a grid of `blocks` blocks of `threads_per_block` threads
// (fewer blocks where the schedule caps them), block after block.
inline void run_grid(int64_t blocks, int threads_per_block, const std::function<void()>& thread) {
  TORCH_CHECK(blocks >= 1 && threads_per_block >= kLanes && threads_per_block % kLanes == 0 &&
                  threads_per_block <= kMaxThreadsPerBlock,
              "emulated CUDA: launch of ", blocks, " blocks of ", threads_per_block,
              " threads; whole warps only, at most ", kMaxThreadsPerBlock, " threads");
  const std::lock_guard lock(launch_lock);
  const uint64_t launch = launches_since_schedule++;
  const Schedule& schedule = active_schedule();
  if (schedule.max_blocks > 0) blocks = std::min(blocks, schedule.max_blocks);
  gridDim = {static_cast<unsigned int>(blocks), 1, 1};
  blockDim = {static_cast<unsigned int>(threads_per_block), 1, 1};
  const std::span<unsigned char> shared = shared_memory();
  Block block(threads_per_block);
  for (int64_t index = 0; index < blocks; ++index) {
    blockIdx = {static_cast<unsigned int>(index), 0, 0};
    std::fill(shared.begin(), shared.end(), 0xff);  // NaN in every floating-point type
    block.run(thread, thread_turns(schedule, launch, index, threads_per_block));
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
