// The CUDA built-ins kernels.cu uses, emulated on the CPU so that its
// arithmetic and indexing can be checked against the Rust reference on
// machines without a GPU (tests/emulated.rs). Blocks run one after another;
// the threads of a block run as OS threads, so __syncthreads and warp
// shuffles are real barriers. Compile with -ffp-contract=off: that is what
// NVRTC's --fmad=false means.
#include <barrier>
#include <math.h>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
// Blocks run one at a time, so one static array per kernel is one block's.
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
extern thread_local dim3 blockIdx, threadIdx;
extern dim3 blockDim, gridDim;
extern std::barrier<> *block_barrier;
extern std::vector<std::barrier<> *> warp_barriers;
extern double warp_slots[1024];

inline void __syncthreads() { block_barrier->arrive_and_wait(); }

inline double __shfl_down_sync(unsigned, double var, unsigned delta, int width) {
    unsigned tid = threadIdx.y * blockDim.x + threadIdx.x;
    unsigned lane = tid % 32;
    warp_slots[tid] = var;
    warp_barriers[tid / 32]->arrive_and_wait();
    // CUDA: a source lane past the end of the width-segment leaves var as it is.
    double r = (lane % width) + delta < (unsigned)width ? warp_slots[tid + delta] : var;
    warp_barriers[tid / 32]->arrive_and_wait();
    return r;
}

inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
