// Runs kernels.cu under cuda_emulation.h in the order device.rs launches
// them, whole and in row chunks, on the inputs tests/emulated.rs writes,
// and writes what the kernels computed for that test to compare with the
// CPU reference. Usage: emulator ROWS COLS N_A N_B PROBE_ROWS IN OUT
#include "cuda_emulation.h"
#include "../../src/kernels.cu"
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <thread>

thread_local dim3 blockIdx, threadIdx;
dim3 blockDim, gridDim;
std::barrier<> *block_barrier;
std::vector<std::barrier<> *> warp_barriers;
double warp_slots[1024];

static void launch(dim3 grid, dim3 block, const std::function<void()> &kernel) {
    gridDim = grid;
    blockDim = block;
    unsigned threads = block.x * block.y;
    for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            std::barrier<> whole(threads);
            block_barrier = &whole;
            std::vector<std::barrier<> *> warps;
            for (unsigned w = 0; w * 32 < threads; ++w)
                warps.push_back(new std::barrier<>(threads - w * 32 < 32 ? threads - w * 32 : 32));
            warp_barriers = warps;
            std::vector<std::thread> pool;
            for (unsigned t = 0; t < threads; ++t)
                pool.emplace_back([&, t, bx, by] {
                    blockIdx.x = bx;
                    blockIdx.y = by;
                    threadIdx.x = t % block.x;
                    threadIdx.y = t / block.x;
                    kernel();
                });
            for (auto &t : pool) t.join();
            for (auto *w : warps) delete w;
        }
}

static dim3 line(unsigned x) {
    dim3 d;
    d.x = x;
    return d;
}

// A small grid-stride launch: fewer threads than elements, so the loops wrap.
static const dim3 STRIDE_GRID = line(2), STRIDE_BLOCK = line(64);

static FILE *in, *out;
static std::vector<float> floats(size_t n) {
    std::vector<float> v(n);
    if (fread(v.data(), sizeof(float), n, in) != n) exit(3);
    return v;
}
static void put(const void *p, size_t bytes) { fwrite(p, 1, bytes, out); }

int main(int argc, char **argv) {
    if (argc != 8) return 2;
    const u64 rows = atoll(argv[1]), cols = atoll(argv[2]), n_a = atoll(argv[3]),
              n_b = atoll(argv[4]), probe = atoll(argv[5]), n = rows * cols;
    in = fopen(argv[6], "rb");
    out = fopen(argv[7], "wb");
    if (!in || !out) return 2;
    // Inputs: receiver, ancestor, two contributors, d, three u, lambdas,
    // thresholds, then the standardised columns of the correlation; dd.
    auto a = floats(n), c = floats(n), b1 = floats(n), b2 = floats(n), d = floats(cols);
    auto u0 = floats(rows), u1 = floats(rows), u2 = floats(rows);
    auto lambdas = floats(4), thresholds = floats(3);
    auto ca = floats(n_a * probe), cb = floats(n_b * probe);
    double dd;
    if (fread(&dd, sizeof dd, 1, in) != 1) return 3;

    // Scores of the three models: sas alpha 1, sas alpha 0.3, ratio eps 1e-8.
    const float *weights[3] = {a.data(), b1.data(), b2.data()};
    const float *us[3] = {u0.data(), u1.data(), u2.data()};
    const int ratio[3] = {0, 0, 1};
    const float param[3] = {1.0f, 0.3f, 1e-8f};
    std::vector<std::vector<float>> scores(3, std::vector<float>(n));
    for (int k = 0; k < 3; ++k) {
        launch(STRIDE_GRID, STRIDE_BLOCK, [&] {
            score_matrix(weights[k], us[k], d.data(), rows, cols, ratio[k], param[k], scores[k].data());
        });
        put(scores[k].data(), n * sizeof(float));
    }

    // Fusion of a weight (units: rows) and of a bias (units: elements),
    // whole and in chunks (5 rows, 500 elements), as device.rs's fuse_block.
    const float *contributors[2] = {b1.data(), b2.data()};
    for (int bias = 0; bias < 2; ++bias)
        for (u64 chunk : {n, bias ? (u64)500 : (u64)5}) {
            u64 per_unit = bias ? 1 : cols, units = bias ? n : rows;
            std::vector<float> fused(a), tau(n), coef(rows);
            unsigned long long receiver_count = 0, counts[2][3] = {};
            for (u64 start = 0; start < units; start += chunk) {
                u64 end = start + chunk < units ? start + chunk : units;
                u64 e0 = start * per_unit, len = (end - start) * per_unit, r = end - start;
                launch(STRIDE_GRID, STRIDE_BLOCK, [&] {
                    count_elected(scores[0].data() + e0, len, thresholds[0], &receiver_count);
                });
                for (int k = 0; k < 2; ++k) {
                    launch(STRIDE_GRID, STRIDE_BLOCK, [&] {
                        masked_task_vector(a.data() + e0, c.data() + e0, scores[0].data() + e0,
                                           thresholds[0], contributors[k] + e0,
                                           scores[k + 1].data() + e0, thresholds[k + 1], len,
                                           tau.data(), counts[k]);
                    });
                    float lp = lambdas[2 * k], lo = lambdas[2 * k + 1];
                    if (bias) {
                        launch(STRIDE_GRID, STRIDE_BLOCK,
                               [&] { add_scaled(fused.data() + e0, tau.data(), len, lp); });
                        continue;
                    }
                    unsigned threads = (unsigned)(4 * r);
                    launch(line((threads + 255) / 256), line(256), [&] {
                        row_coefficients(tau.data(), d.data(), r, cols, dd, 1e-8f, coef.data());
                    });
                    launch(STRIDE_GRID, STRIDE_BLOCK, [&] {
                        add_decoupled(fused.data() + e0, tau.data(), d.data(), coef.data(), r, cols,
                                      lp, lo);
                    });
                }
            }
            put(fused.data(), n * sizeof(float));
            for (int k = 0; k < 2; ++k) {
                unsigned long long row[4] = {receiver_count, counts[k][0], counts[k][1], counts[k][2]};
                put(row, sizeof row);
            }
        }

    // Correlation in 16 x 16 tiles.
    std::vector<float> corr(n_a * n_b);
    dim3 grid, tile;
    grid.x = (unsigned)((n_b + 15) / 16);
    grid.y = (unsigned)((n_a + 15) / 16);
    tile.x = tile.y = 16;
    launch(grid, tile, [&] { correlation(ca.data(), cb.data(), n_a, n_b, probe, corr.data()); });
    put(corr.data(), corr.size() * sizeof(float));
    return fclose(out) == 0 ? 0 : 4;
}
