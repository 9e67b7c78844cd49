// A CUDA emulator for the torch-free kernels in csrc/cuda, so that they run on a machine without a
// GPU (tests/test_cuda_emulated.py). Each CUDA thread of a block is a fiber on one OS thread
// (started with makecontext/setcontext, switched with _setjmp/_longjmp, which unlike swapcontext
// make no system call); blocks run one after another. A fiber runs until it reaches a barrier
// (__syncthreads, or a warp collective: shuffles, ballots), where it yields; a barrier opens when
// every fiber of its group that has not exited waits at it, and a state where fibers wait at
// different barriers is reported as a divergent barrier (a bug on the GPU too). Atomics are plain
// read-modify-writes (one OS thread). Numerics follow the host: the kernels' __CUDA_ARCH__ paths
// are not compiled.
//
// What it checks: the kernels' logic, indexing, barriers and the launchers' plans, on inputs the
// tests compare with the reference and the CPU kernels. What it cannot: speed; data races (a fiber
// runs uninterrupted from one barrier to the next, so unsynchronised accesses never interleave);
// reads of shared memory before any write (shared variables keep the previous block's values);
// device-only code paths.
#pragma once
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace collab_emu {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 64 * 1024;

enum class Wait { kNone, kBlock, kWarp };

// A fiber lives for the whole process: it runs thread t of one block after another (entry()'s
// loop), so only its first block starts it with setcontext (a system call).
struct Fiber {
  ucontext_t start;                // entry on the fiber's own stack
  jmp_buf resume;                  // where it yielded, or finished its last block
  std::unique_ptr<char[]> stack;  // uninitialised: zeroing it would dominate small launches
  Wait wait = Wait::kNone;
  bool started = false;
  bool done = false;
};

// Fibers are reused by every block (a block of 1024 threads would otherwise allocate 1024 stacks).
// They never move: a ucontext_t points into itself (its floating-point state).
class FiberPool {
 public:
  Fiber& operator[](int t) { return *fibers_[t]; }
  int size() const { return static_cast<int>(fibers_.size()); }
  void grow(int threads) {
    while (size() < threads) fibers_.push_back(std::make_unique<Fiber>());
  }

 private:
  std::vector<std::unique_ptr<Fiber>> fibers_;
};

inline FiberPool& fiber_pool() {
  static FiberPool pool;
  return pool;
}

// The emulated device: the SM count and blocks per SM the launchers' plans see.
struct Device {
  int sm_count = 4;
  int blocks_per_sm = 2;
};
inline Device device;
// Blocks run by every launch so far: how tests see the grid a launcher planned.
inline uint64_t blocks_launched = 0;

class Block {
 public:
  static Block*& current() {
    static Block* block = nullptr;
    return block;
  }

  // Runs body() as every thread of one block.
  void run(const dim3& block, const std::function<void()>& body) {
    threads_ = static_cast<int>(block.x * block.y * block.z);
    body_ = &body;
    FiberPool& fibers = fiber_pool();
    fibers.grow(threads_);
    for (int t = 0; t < threads_; ++t) {
      Fiber& f = fibers[t];
      if (!f.stack) {
        f.stack.reset(new char[kStackBytes]);
        getcontext(&f.start);
        f.start.uc_stack.ss_sp = f.stack.get();
        f.start.uc_stack.ss_size = kStackBytes;
        f.start.uc_link = nullptr;  // entry() never returns
        makecontext(&f.start, reinterpret_cast<void (*)()>(&Block::entry), 0);
      }
      f.wait = Wait::kNone;
      f.done = false;
    }
    exchange_.assign(static_cast<size_t>(threads_), 0);
    flags_.assign(static_cast<size_t>(threads_), 0);
    current() = this;
    for (;;) {
      bool progressed = false, all_done = true;
      for (int t = 0; t < threads_; ++t) {
        Fiber& f = fibers[t];
        if (f.done) continue;
        all_done = false;
        if (f.wait != Wait::kNone) continue;
        running_ = t;
        set_thread_index(t, block);
        if (_setjmp(scheduler_) == 0) {
          if (f.started) _longjmp(f.resume, 1);
          f.started = true;
          setcontext(&f.start);
        }
        progressed = true;
      }
      if (all_done) break;
      if (!progressed && !release_waiting()) {
        std::fprintf(stderr, "collab_emu: divergent barrier in block (%u, %u, %u)\n", blockIdx.x, blockIdx.y,
                     blockIdx.z);
        std::abort();
      }
    }
    current() = nullptr;
  }

  void block_barrier() { wait_at(Wait::kBlock); }
  void warp_barrier() { wait_at(Wait::kWarp); }
  int thread() const { return running_; }
  int threads() const { return threads_; }
  bool lane_live(int t) const { return t < threads_ && !fiber_pool()[t].done; }
  uint64_t* exchange() { return exchange_.data(); }
  int* flags() { return flags_.data(); }

 private:
  static void entry() {
    for (;;) {
      Block* self = current();
      (*self->body_)();
      Fiber& f = fiber_pool()[self->running_];
      f.done = true;
      if (_setjmp(f.resume) == 0) _longjmp(self->scheduler_, 1);  // resumed by the next block
    }
  }

  void set_thread_index(int t, const dim3& block) {
    threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
  }

  void wait_at(Wait kind) {
    Fiber& f = fiber_pool()[running_];
    f.wait = kind;
    if (_setjmp(f.resume) == 0) _longjmp(scheduler_, 1);
  }

  // Opens the barriers whose groups have arrived; false when none can open.
  bool release_waiting() {
    FiberPool& fibers = fiber_pool();
    bool released = false;
    bool all_at_block = true;
    for (int t = 0; t < threads_; ++t) {
      if (!fibers[t].done && fibers[t].wait != Wait::kBlock) all_at_block = false;
    }
    if (all_at_block) {
      for (int t = 0; t < threads_; ++t) fibers[t].wait = Wait::kNone;
      return true;
    }
    for (int warp = 0; warp * kWarp < threads_; ++warp) {
      bool arrived = true, any = false;
      for (int t = warp * kWarp; t < (warp + 1) * kWarp && t < threads_; ++t) {
        if (fibers[t].done) continue;
        any = true;
        arrived &= fibers[t].wait == Wait::kWarp;
      }
      if (!any || !arrived) continue;
      for (int t = warp * kWarp; t < (warp + 1) * kWarp && t < threads_; ++t) fibers[t].wait = Wait::kNone;
      released = true;
    }
    return released;
  }

  int threads_ = 0;
  int running_ = 0;
  const std::function<void()>* body_ = nullptr;
  std::vector<uint64_t> exchange_;
  std::vector<int> flags_;
  jmp_buf scheduler_;
};

inline Block& block() { return *Block::current(); }

// kernel<<<grid, threads, shared, stream>>>(args...) becomes launch(kernel, grid, threads, shared, stream)(args...).
template <class... Params>
auto launch(void (*kernel)(Params...), dim3 grid, dim3 threads, size_t = 0, void* = nullptr) {
  return [=](auto&&... args) {
    gridDim = grid;
    blockDim = threads;
    blocks_launched += uint64_t{grid.x} * grid.y * grid.z;
    const std::function<void()> body = [&]() { kernel(args...); };
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          Block b;
          b.run(threads, body);
        }
      }
    }
  };
}

// One value from every live lane of the calling warp: lane l's value is slot l afterwards.
template <class T>
T warp_exchange(T value, int source_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles of at most 8 bytes");
  Block& b = block();
  const int me = b.thread(), base = me - me % kWarp;
  std::memcpy(&b.exchange()[me], &value, sizeof(T));
  b.warp_barrier();
  T result = value;
  if (source_lane >= 0 && source_lane < kWarp && b.lane_live(base + source_lane)) {
    std::memcpy(&result, &b.exchange()[base + source_lane], sizeof(T));
  }
  b.warp_barrier();  // every lane has read before the slots are written again
  return result;
}

}  // namespace collab_emu

inline void __syncthreads() { collab_emu::block().block_barrier(); }
inline int __syncthreads_or(int predicate) {
  collab_emu::Block& b = collab_emu::block();
  b.flags()[b.thread()] = predicate != 0;
  b.block_barrier();
  int any = 0;
  for (int t = 0; t < b.threads(); ++t) any |= b.lane_live(t) && b.flags()[t];
  b.block_barrier();
  return any;
}
inline void __threadfence() {}

template <class T>
T __shfl_xor_sync(unsigned, T value, int offset) {
  const int lane = collab_emu::block().thread() % collab_emu::kWarp;
  return collab_emu::warp_exchange(value, lane ^ offset);
}
template <class T>
T __shfl_down_sync(unsigned, T value, int offset) {
  const int lane = collab_emu::block().thread() % collab_emu::kWarp;
  return collab_emu::warp_exchange(value, lane + offset < collab_emu::kWarp ? lane + offset : lane);
}
template <class T>
T __shfl_up_sync(unsigned, T value, int offset) {
  const int lane = collab_emu::block().thread() % collab_emu::kWarp;
  return collab_emu::warp_exchange(value, lane >= offset ? lane - offset : lane);
}
inline unsigned __ballot_sync(unsigned, int predicate) {
  collab_emu::Block& b = collab_emu::block();
  const int me = b.thread(), base = me - me % collab_emu::kWarp;
  b.flags()[me] = predicate != 0;
  b.warp_barrier();
  unsigned bits = 0;
  for (int lane = 0; lane < collab_emu::kWarp; ++lane) {
    if (b.lane_live(base + lane) && b.flags()[base + lane]) bits |= 1u << lane;
  }
  b.warp_barrier();
  return bits;
}

template <class T>
T __ldg(const T* p) { return *p; }
template <class T>
T __ldcg(const T* p) { return *p; }

template <class T, class U>
T atomicAdd(T* address, U value) {
  const T old = *address;
  *address = old + static_cast<T>(value);
  return old;
}
template <class T, class U>
T atomicMax(T* address, U value) {
  const T old = *address;
  if (static_cast<T>(value) > old) *address = static_cast<T>(value);
  return old;
}
template <class T, class U>
T atomicMin(T* address, U value) {
  const T old = *address;
  if (static_cast<T>(value) < old) *address = static_cast<T>(value);
  return old;
}
template <class T, class U>
T atomicOr(T* address, U value) {
  const T old = *address;
  *address = old | static_cast<T>(value);
  return old;
}

// CUDA's integer min/max overloads (mixed widths promote).
template <class A, class B>
std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <class A, class B>
std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

inline float __uint_as_float(unsigned bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
inline unsigned __float_as_uint(float value) {
  unsigned bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}
inline float __expf(float x) { return std::exp(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
