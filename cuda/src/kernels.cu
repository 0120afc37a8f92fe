// Device kernels of flatmerge's element-wise SAFE-M stages (SPEC Sec. 1.2-1.3)
// and FAM's similarity matrix (SPEC Sec. 2.3), compiled at run time by NVRTC.
//
// Each kernel mirrors one CPU function of `flatmerge::safe_m`, `select` or
// `reduce`, operation for operation. They are compiled with
// `--fmad=false --prec-div=true --prec-sqrt=true --ftz=false` (device.rs):
// without FMA contraction every f32 `*`, `+`, `-` and `/` rounds once, to
// nearest, exactly as Rust's (which never contracts), so scores, masks,
// counts, coefficients and fused values are bit-identical to the CPU path.
// With `--fmad=true` NVRTC may fuse a product into the add that follows it
// (one rounding instead of two) at: `1 + alpha*g^2` and `g*g + eps` in the
// score, `tau - c*d` and `lambda_proj*p + lambda_ortho*o` in the fusion;
// those values would then differ from the CPU's in the last bits, and a
// score that moves across the threshold changes a mask. The f64 dot
// products are unaffected either way: a product of two f32 is exact in
// f64, so an FMA rounds the same.
//
// Sizes are 64-bit and loops grid-stride, so a chunk of any size runs with
// a bounded grid.

typedef unsigned long long u64;

#define GRID_STRIDE(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (u64)gridDim.x * blockDim.x)

// safe_m::safe_score. `ratio` selects the form; `param` is alpha (sas) or eps (ratio).
__device__ __forceinline__ float safe_score(float w, float g, int ratio, float param) {
    float salience = fabsf(w * g);
    float sharpness = g * g;
    return ratio ? salience / (sharpness + param) : salience / (1.0f + param * sharpness);
}

// select::is_elected.
__device__ __forceinline__ bool is_elected(float score, float threshold) {
    return score >= threshold && score > 0.0f;
}

// safe_m::is_conflict, by signs as on the CPU (a product could underflow).
__device__ __forceinline__ bool is_conflict(bool ea, bool eb, float ta, float tb) {
    return ea && eb && ((ta > 0.0f && tb < 0.0f) || (ta < 0.0f && tb > 0.0f));
}

// safe_m::score_matrix: out[r*cols + j] = S(w[r*cols + j], u[r]*v[j]).
extern "C" __global__ void score_matrix(const float *w, const float *u, const float *v,
                                        u64 rows, u64 cols, int ratio, float param,
                                        float *out) {
    GRID_STRIDE(i, rows * cols) {
        u64 r = i / cols;
        u64 j = i - r * cols;
        out[i] = safe_score(w[i], u[r] * v[j], ratio, param);
    }
}

// safe_m::score_vector: out[i] = S(b[i], u[i]).
extern "C" __global__ void score_vector(const float *b, const float *u, u64 n, int ratio,
                                        float param, float *out) {
    GRID_STRIDE(i, n) { out[i] = safe_score(b[i], u[i], ratio, param); }
}

// |{i : is_elected(scores[i], threshold)}| added to *count. Integer sums:
// the total does not depend on the order of the atomics.
extern "C" __global__ void count_elected(const float *scores, u64 n, float threshold,
                                         u64 *count) {
    u64 local = 0;
    GRID_STRIDE(i, n) { local += is_elected(scores[i], threshold); }
    if (local) atomicAdd(count, local);
}

// The conflict-free mask of one contributor (SPEC Sec. 1.2) applied to its task
// vector, as in safe_m::fuse_block: tau[i] = tau_B[i] where B elected i and
// there is no sign conflict with A, else 0. counts: elected, conflicts, kept.
extern "C" __global__ void masked_task_vector(const float *a, const float *c,
                                              const float *scores_a, float threshold_a,
                                              const float *b, const float *scores_b,
                                              float threshold_b, u64 n, float *tau,
                                              u64 *counts) {
    u64 elected = 0, conflicts = 0, kept = 0;
    GRID_STRIDE(i, n) {
        float tau_a = a[i] - c[i];
        float tau_b = b[i] - c[i];
        bool ea = is_elected(scores_a[i], threshold_a);
        bool eb = is_elected(scores_b[i], threshold_b);
        bool conflict = is_conflict(ea, eb, tau_a, tau_b);
        bool keep = eb && !conflict;
        elected += eb;
        conflicts += conflict;
        kept += keep;
        tau[i] = keep ? tau_b : 0.0f;
    }
    if (elected) atomicAdd(&counts[0], elected);
    if (conflicts) atomicAdd(&counts[1], conflicts);
    if (kept) atomicAdd(&counts[2], kept);
}

// safe_m::projection_coefficient of every row: c[r] = <tau[r], d> / (dd + eps)
// in reduce::dot's order. Four threads per row, thread `lane` summing the
// columns j == lane (mod 4) in increasing order in f64 (reduce::dot's four
// lanes, its remainder included), combined as (l0 + l1) + (l2 + l3).
// Launched with one thread per (row, lane), blockDim a multiple of 32.
extern "C" __global__ void row_coefficients(const float *tau, const float *d, u64 rows,
                                            u64 cols, double dd, float epsilon, float *coef) {
    u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 row = t / 4;
    unsigned lane = (unsigned)(t % 4);
    double acc = 0.0;
    if (row < rows) {
        const float *x = tau + row * cols;
        for (u64 j = lane; j < cols; j += 4) acc += (double)x[j] * (double)d[j];
    }
    // Every thread of the warp takes part in the shuffles, rows or not.
    double l1 = __shfl_down_sync(0xffffffffu, acc, 1, 4);
    double l2 = __shfl_down_sync(0xffffffffu, acc, 2, 4);
    double l3 = __shfl_down_sync(0xffffffffu, acc, 3, 4);
    if (row < rows && lane == 0) {
        double dot = (acc + l1) + (l2 + l3);
        coef[row] = (float)(dot / (dd + (double)epsilon));
    }
}

// safe_m::add_decoupled with a direction: out += lambda_proj*P + lambda_ortho*O,
// P = c[r]*d[j], O = tau - P.
extern "C" __global__ void add_decoupled(float *out, const float *tau, const float *d,
                                         const float *coef, u64 rows, u64 cols,
                                         float lambda_proj, float lambda_ortho) {
    GRID_STRIDE(i, rows * cols) {
        u64 r = i / cols;
        u64 j = i - r * cols;
        float p = coef[r] * d[j];
        float o = tau[i] - p;
        out[i] += lambda_proj * p + lambda_ortho * o;
    }
}

// safe_m::add_decoupled without a direction (a bias): out += lambda_proj*tau.
extern "C" __global__ void add_scaled(float *out, const float *tau, u64 n, float lambda_proj) {
    GRID_STRIDE(i, n) { out[i] += lambda_proj * tau[i]; }
}

// fam::correlation: out[i][j] = sum_r a[i][r]*b[j][r] for a [n_a x rows],
// b [n_b x rows], out [n_a x n_b], all row-major. 16 x 16 tiles in shared
// memory; products exact in f64 and summed in f64 in r order, then rounded
// once, so the result is the correctly rounded dot product up to f64
// rounding. The CPU's sgemm sums in f32 in its own blocked order: the two
// agree to about `rows*2^-24` for the unit columns fam::standardise_columns
// gives, not bit for bit.
#define TILE 16
extern "C" __global__ void correlation(const float *a, const float *b, u64 n_a, u64 n_b,
                                       u64 rows, float *out) {
    __shared__ float ta[TILE][TILE + 1];
    __shared__ float tb[TILE][TILE + 1];
    u64 i = (u64)blockIdx.y * TILE + threadIdx.y;  // row of a / out
    u64 j = (u64)blockIdx.x * TILE + threadIdx.x;  // row of b / column of out
    u64 bj = (u64)blockIdx.x * TILE + threadIdx.y; // row of b this thread loads
    double acc = 0.0;
    for (u64 r0 = 0; r0 < rows; r0 += TILE) {
        u64 r = r0 + threadIdx.x;
        ta[threadIdx.y][threadIdx.x] = (i < n_a && r < rows) ? a[i * rows + r] : 0.0f;
        tb[threadIdx.y][threadIdx.x] = (bj < n_b && r < rows) ? b[bj * rows + r] : 0.0f;
        __syncthreads();
        for (int k = 0; k < TILE; ++k)
            acc += (double)ta[threadIdx.y][k] * (double)tb[threadIdx.x][k];
        __syncthreads();
    }
    if (i < n_a && j < n_b) out[i * n_b + j] = (float)acc;
}
