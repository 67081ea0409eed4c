// The emulated grid: blocks are spread over OpenMP threads; inside a block every
// CUDA thread is a ucontext coroutine, and __syncthreads() switches to the next
// one, so a block's threads all reach the barrier before any passes it.
#include <omp.h>

#include <stdexcept>

#include "cuda_emulation.h"

namespace ndf_emu {

thread_local dim3 block_idx, thread_idx, block_dim, grid_dim;

namespace {

constexpr size_t kStack = 256 * 1024;

struct BlockRun {
  ucontext_t scheduler;
  std::vector<ucontext_t> ctx;
  std::vector<char> stacks;
  std::vector<unsigned char> done;
  unsigned current = 0;
  void (*trampoline)(void*) = nullptr;
  void* payload = nullptr;
};

thread_local BlockRun* tl_run = nullptr;

void thread_entry() {
  BlockRun* r = tl_run;
  r->trampoline(r->payload);
  r->done[r->current] = 1;
  // returning resumes uc_link = the scheduler
}

dim3 unflatten(unsigned i, dim3 d) { return dim3(i % d.x, (i / d.x) % d.y, i / (d.x * d.y)); }

void run_block(BlockRun& r, dim3 block) {
  const unsigned n = block.x * block.y * block.z;
  if (r.ctx.size() < n) {
    r.ctx.resize(n);
    r.stacks.resize(size_t(n) * kStack);
    r.done.resize(n);
  }
  for (unsigned t = 0; t < n; ++t) {
    r.done[t] = 0;
    getcontext(&r.ctx[t]);
    r.ctx[t].uc_stack.ss_sp = r.stacks.data() + size_t(t) * kStack;
    r.ctx[t].uc_stack.ss_size = kStack;
    r.ctx[t].uc_link = &r.scheduler;
    makecontext(&r.ctx[t], thread_entry, 0);
  }
  unsigned remaining = n;
  while (remaining) {  // one round = every live thread runs to its next barrier or its end
    for (unsigned t = 0; t < n; ++t) {
      if (r.done[t]) continue;
      r.current = t;
      thread_idx = unflatten(t, block);
      swapcontext(&r.scheduler, &r.ctx[t]);
      if (r.done[t]) --remaining;
    }
  }
}

}  // namespace

void sync_threads() {
  BlockRun* r = tl_run;
  swapcontext(&r->ctx[r->current], &r->scheduler);
}

void run_grid(dim3 grid, dim3 block, void (*trampoline)(void*), void* payload) {
  const long blocks = long(grid.x) * grid.y * grid.z;
#pragma omp parallel
  {
    BlockRun run;
    run.trampoline = trampoline;
    run.payload = payload;
    tl_run = &run;
    grid_dim = grid;
    block_dim = block;
#pragma omp for schedule(dynamic, 1)
    for (long b = 0; b < blocks; ++b) {
      block_idx = unflatten(unsigned(b), grid);
      run_block(run, block);
    }
    tl_run = nullptr;
  }
}

}  // namespace ndf_emu

// Device discovery of the emulated backend: one "device", the CPU.
#include "ndf/cuda_backend.h"
namespace ndf {
namespace cuda {
int device_count(std::string* why) {
  if (why) why->clear();
  return 1;
}
std::string device_name(int) { return "CPU (CUDA emulation)"; }
}  // namespace cuda
}  // namespace ndf
