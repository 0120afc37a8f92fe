// A C++ session: the slice kernels on deterministic tensors (checked
// against each other and written out for the Rust test to compare), and a
// recorder shared by four threads.
// Usage: session_cpp STATS_PATH KERNELS_PATH
#include <flatmerge.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "testdata.h"

namespace {

void check(flatmerge_status status, const char *what) {
    if (status != FLATMERGE_STATUS_OK) {
        std::string message(flatmerge_last_error(nullptr, 0), '\0');
        flatmerge_last_error(&message[0], message.size());
        throw std::runtime_error(std::string(what) + " failed with " +
                                 std::to_string(static_cast<unsigned>(status)) + ": " +
                                 message.c_str());
    }
}

void expect(bool ok, const std::string &what) {
    if (!ok) {
        throw std::runtime_error("check failed: " + what);
    }
}

using Recorder = std::unique_ptr<flatmerge_recorder, decltype(&flatmerge_recorder_free)>;

// The tensors of the kernel test (mirrored in ffi/tests/common/mod.rs).
constexpr size_t ROWS = 5, COLS = 7, CONTRIBUTORS = 2;

struct Tensors {
    std::vector<float> ancestor, receiver, x_mean;
    std::vector<std::vector<float>> contributors, y;  // y[0] ancestor, y[1] receiver, y[2 + k]
};

Tensors tensors(size_t n) {
    Tensors t;
    for (size_t i = 0; i < n; i++) {
        t.ancestor.push_back(fm_value(0, i, 0, 5));
        t.receiver.push_back(t.ancestor[i] + fm_value(1, i, 1, 6) / 8.0f);
    }
    for (size_t k = 0; k < CONTRIBUTORS; k++) {
        std::vector<float> w;
        for (size_t i = 0; i < n; i++) {
            w.push_back(t.ancestor[i] + fm_value(2 + k, i, 2, 7) / 8.0f);
        }
        t.contributors.push_back(w);
    }
    for (size_t j = 0; j < COLS; j++) {
        t.x_mean.push_back(fm_value(9, j, 3, 8));
    }
    for (size_t m = 0; m < 2 + CONTRIBUTORS; m++) {
        std::vector<float> y;
        for (size_t r = 0; r < ROWS; r++) {
            y.push_back(fm_value(10 + m, r, 4, 9));
        }
        t.y.push_back(y);
    }
    return t;
}

flatmerge_election elections(size_t model) {
    // Receiver, then the contributors.
    switch (model) {
        case 0: return flatmerge_election{0.4, flatmerge_score_form{FLATMERGE_SCORE_KIND_SAS, 1.0f}};
        case 1: return flatmerge_election{0.5, flatmerge_score_form{FLATMERGE_SCORE_KIND_SAS, 0.5f}};
        default: return flatmerge_election{0.6, flatmerge_score_form{FLATMERGE_SCORE_KIND_RATIO, 1e-3f}};
    }
}
constexpr float LAMBDA_PROJ[CONTRIBUTORS] = {1.0f, 0.75f};
constexpr float LAMBDA_ORTHO[CONTRIBUTORS] = {0.5f, 0.25f};
constexpr float EPSILON = 1e-8f;

struct Merged {
    std::vector<float> values;
    std::vector<flatmerge_mask_counts> counts;
};

Merged merge_tensor(const Tensors &t, bool is_bias) {
    std::vector<flatmerge_tensor_contributor> list;
    for (size_t k = 0; k < CONTRIBUTORS; k++) {
        list.push_back(flatmerge_tensor_contributor{
            t.contributors[k].data(), t.contributors[k].size(), t.y[2 + k].data(),
            t.y[2 + k].size(), elections(1 + k), LAMBDA_PROJ[k], LAMBDA_ORTHO[k]});
    }
    Merged m{std::vector<float>(t.receiver.size()),
             std::vector<flatmerge_mask_counts>(CONTRIBUTORS)};
    check(flatmerge_merge_tensor(t.receiver.data(), t.receiver.size(), t.y[1].data(),
                                 t.y[1].size(), elections(0), t.ancestor.data(),
                                 t.ancestor.size(), t.y[0].data(), t.y[0].size(),
                                 is_bias ? nullptr : t.x_mean.data(),
                                 is_bias ? 0 : t.x_mean.size(), list.data(), list.size(),
                                 is_bias, EPSILON, m.values.data(), m.values.size(),
                                 m.counts.data(), m.counts.size()),
          "flatmerge_merge_tensor");
    return m;
}

// The same merge from the slice kernels, in blocks of rows: scores,
// thresholds, masks, fusion.
void kernels_agree_with_merge_tensor(const Tensors &t, const Merged &whole) {
    const size_t n = ROWS * COLS;
    std::vector<std::vector<float>> scores;
    std::vector<float> thresholds;
    const std::vector<float> *weights[1 + CONTRIBUTORS] = {&t.receiver, &t.contributors[0],
                                                           &t.contributors[1]};
    for (size_t m = 0; m < 1 + CONTRIBUTORS; m++) {
        std::vector<float> u(ROWS), s(n);
        for (size_t r = 0; r < ROWS; r++) {
            u[r] = t.y[1 + m][r] - t.y[0][r];
        }
        check(flatmerge_score_matrix(weights[m]->data(), n, u.data(), ROWS, t.x_mean.data(),
                                     COLS, elections(m).form, s.data(), n),
              "flatmerge_score_matrix");
        float threshold = NAN;
        check(flatmerge_election_threshold(s.data(), n, elections(m).density, &threshold),
              "flatmerge_election_threshold");
        scores.push_back(s);
        thresholds.push_back(threshold);
    }
    // Fusion in two blocks of rows: [0, 2) and [2, 5).
    std::vector<float> out(n);
    std::vector<flatmerge_mask_counts> total(CONTRIBUTORS);
    for (auto block : {std::pair<size_t, size_t>{0, 2}, std::pair<size_t, size_t>{2, 5}}) {
        size_t start = block.first * COLS, len = (block.second - block.first) * COLS;
        std::vector<flatmerge_block_contributor> list;
        for (size_t k = 0; k < CONTRIBUTORS; k++) {
            list.push_back(flatmerge_block_contributor{
                weights[1 + k]->data() + start, len, scores[1 + k].data() + start, len,
                thresholds[1 + k], LAMBDA_PROJ[k], LAMBDA_ORTHO[k]});
        }
        std::vector<flatmerge_mask_counts> counts(CONTRIBUTORS);
        check(flatmerge_fuse_block(t.receiver.data() + start, len, t.ancestor.data() + start, len,
                                   scores[0].data() + start, len, thresholds[0], list.data(),
                                   list.size(), t.x_mean.data(), COLS, EPSILON,
                                   out.data() + start, len, counts.data(), counts.size()),
              "flatmerge_fuse_block");
        for (size_t k = 0; k < CONTRIBUTORS; k++) {
            total[k].receiver_elected += counts[k].receiver_elected;
            total[k].elected += counts[k].elected;
            total[k].conflicts += counts[k].conflicts;
            total[k].kept += counts[k].kept;
        }
    }
    for (size_t i = 0; i < n; i++) {
        expect(out[i] == whole.values[i], "fuse_block in blocks equals merge_tensor at " +
                                              std::to_string(i));
    }
    for (size_t k = 0; k < CONTRIBUTORS; k++) {
        // The mask kernel's counts are the fusion's.
        std::vector<float> tau_a(n), tau_b(n);
        for (size_t i = 0; i < n; i++) {
            tau_a[i] = t.receiver[i] - t.ancestor[i];
            tau_b[i] = t.contributors[k][i] - t.ancestor[i];
        }
        std::vector<uint8_t> mask(n, 7);
        flatmerge_mask_counts c{};
        check(flatmerge_conflict_free_mask(scores[0].data(), n, thresholds[0],
                                           scores[1 + k].data(), n, thresholds[1 + k],
                                           tau_a.data(), n, tau_b.data(), n, mask.data(), n, &c),
              "flatmerge_conflict_free_mask");
        uint64_t ones = 0;
        for (uint8_t b : mask) {
            expect(b == 0 || b == 1, "mask bytes are 0 or 1");
            ones += b;
        }
        expect(ones == c.kept, "kept counts the mask's ones");
        expect(c.receiver_elected == total[k].receiver_elected && c.elected == total[k].elected &&
                   c.conflicts == total[k].conflicts && c.kept == total[k].kept &&
                   c.kept == whole.counts[k].kept && c.conflicts == whole.counts[k].conflicts,
               "mask counts equal fusion counts");
        // P + O = τ_u and ⟨O[r], d⟩ ≈ 0 (SPEC §1.3).
        std::vector<float> tau_u(n), p(n), o(n);
        for (size_t i = 0; i < n; i++) {
            tau_u[i] = mask[i] ? tau_b[i] : 0.0f;
        }
        check(flatmerge_project_rows(tau_u.data(), n, t.x_mean.data(), COLS, EPSILON, p.data(), n,
                                     o.data(), n),
              "flatmerge_project_rows");
        for (size_t r = 0; r < ROWS; r++) {
            double od = 0, dd = 0;
            for (size_t j = 0; j < COLS; j++) {
                size_t i = r * COLS + j;
                expect(std::fabs(p[i] + o[i] - tau_u[i]) <= 1e-6f, "P + O = tau_u");
                od += static_cast<double>(o[i]) * t.x_mean[j];
                dd += static_cast<double>(t.x_mean[j]) * t.x_mean[j];
            }
            expect(std::fabs(od) <= 1e-5 * (1 + std::sqrt(dd)), "O is orthogonal to d");
        }
    }
}

void record(const char *path) {
    flatmerge_recorder *raw = nullptr;
    check(flatmerge_recorder_new(FM_MODEL, FM_PROBE, FM_MAX_EXAMPLES, FLATMERGE_MISSING_ROWS_ZERO,
                                 &raw),
          "flatmerge_recorder_new");
    Recorder recorder(raw, flatmerge_recorder_free);
    // Four threads share the handle; thread i pushes the examples e with
    // e % 4 == i, so batches arrive in an order nobody controls.
    std::vector<std::thread> threads;
    std::vector<std::string> errors(4);
    for (uint64_t i = 0; i < 4; i++) {
        threads.emplace_back([&, i] {
            try {
                for (uint64_t e = i; e < FM_EXAMPLES; e += 4) {
                    for (int layer = 0; layer < 2; layer++) {
                        if (!fm_reaches(layer, e)) continue;
                        size_t rows = fm_rows(e), in = FM_IN[layer], out = FM_OUT[layer];
                        std::vector<float> x(rows * in), y(rows * out);
                        std::vector<uint16_t> xb(rows * in), yb(rows * out);
                        for (size_t r = 0; r < rows; r++) {
                            for (size_t j = 0; j < in; j++) {
                                x[r * in + j] = fm_value(e, r, j, 2 * layer);
                                xb[r * in + j] = fm_bf16(x[r * in + j]);
                            }
                            for (size_t j = 0; j < out; j++) {
                                y[r * out + j] = fm_value(e, r, j, 2 * layer + 1);
                                yb[r * out + j] = fm_bf16(y[r * out + j]);
                            }
                        }
                        if (layer == 0) {
                            check(flatmerge_recorder_push_f32(recorder.get(), FM_LAYERS[layer],
                                                              x.data(), y.data(), rows, in, out,
                                                              e, fm_modality(e)),
                                  "flatmerge_recorder_push_f32");
                        } else {
                            check(flatmerge_recorder_push_bf16(recorder.get(), FM_LAYERS[layer],
                                                               xb.data(), yb.data(), rows, in,
                                                               out, e, fm_modality(e)),
                                  "flatmerge_recorder_push_bf16");
                        }
                    }
                }
            } catch (const std::exception &e) {
                errors[i] = e.what();
            }
        });
    }
    for (auto &t : threads) t.join();
    for (auto &e : errors) {
        if (!e.empty()) throw std::runtime_error(e);
    }
    check(flatmerge_recorder_save(recorder.get(), path), "flatmerge_recorder_save");
}

}  // namespace

int main(int argc, char **argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s STATS_PATH KERNELS_PATH\n", argv[0]);
        return 2;
    }
    try {
        Tensors weight = tensors(ROWS * COLS), bias = tensors(ROWS);
        Merged w = merge_tensor(weight, false), b = merge_tensor(bias, true);
        kernels_agree_with_merge_tensor(weight, w);
        FILE *f = std::fopen(argv[2], "wb");
        if (f == nullptr) throw std::runtime_error("cannot write " + std::string(argv[2]));
        std::fwrite(w.values.data(), sizeof(float), w.values.size(), f);
        std::fwrite(b.values.data(), sizeof(float), b.values.size(), f);
        std::fwrite(w.counts.data(), sizeof(flatmerge_mask_counts), w.counts.size(), f);
        std::fwrite(b.counts.data(), sizeof(flatmerge_mask_counts), b.counts.size(), f);
        std::fclose(f);
        record(argv[1]);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    std::printf("session ok (C++)\n");
    return 0;
}
