/*
 * flatmerge C ABI: merges, the activation statistics recorder and the
 * SAFE-M slice kernels. Link with -lflatmerge (pkg-config flatmerge, or
 * CMake find_package(flatmerge) and the target flatmerge::flatmerge).
 *
 * Conventions
 * - Status: every function that can fail returns a flatmerge_status
 *   (FLATMERGE_STATUS_OK is 0; the numbers are stable). It also sets the
 *   calling thread's last error message (empty on success), which
 *   flatmerge_last_error copies into a caller buffer.
 * - Arguments: a NULL pointer is FLATMERGE_STATUS_NULL_POINTER unless the
 *   function says NULL is allowed. Buffers come as (pointer, element count)
 *   pairs, or a pointer and the shape that gives its count; a zero count, a
 *   count that does not match the others, whose byte size overflows, a misaligned pointer, or an output that overlaps another
 *   buffer is FLATMERGE_STATUS_INVALID_ARGUMENT. Strings (paths, names,
 *   YAML) are NUL-terminated UTF-8; other bytes are
 *   FLATMERGE_STATUS_INVALID_UTF8. Element values are not checked.
 * - Outputs are written only on success: every check happens before the
 *   first write, and on error outputs are left as they were. (After
 *   FLATMERGE_STATUS_PANIC, which reports a bug in flatmerge, they are
 *   unspecified.)
 * - Ownership: arguments are borrowed for the duration of the call unless
 *   a function says otherwise. A handle returned by a _new function is
 *   owned by the caller and released with the matching _free, which accepts
 *   NULL. Handles are checked on every call (a registry of live handles):
 *   a freed or foreign pointer gives FLATMERGE_STATUS_WRONG_HANDLE. This is
 *   best effort: a new handle may reuse a freed one's address.
 * - Panics never cross the boundary: they become FLATMERGE_STATUS_PANIC.
 * - Threads: each function says what it allows; the kernels and merges are
 *   thread-safe, the recorder can be shared between threads.
 */

#ifndef FLATMERGE_H
#define FLATMERGE_H

/* Generated from ffi/src by cbindgen 0.29.4 (ffi/cbindgen.toml): do not edit.
 * `FLATMERGE_BLESS=1 cargo test -p flatmerge-ffi --test header` rewrites it. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/**
 * The result of every call that can fail. The numbers are stable: a code
 * keeps its number in every later version, and new codes get new numbers.
 * Codes 1–99 are the library's error kinds, 100 and above misuse of the
 * C API. The describe and last-error functions take a code as a plain
 * `uint32_t`, so an unknown number is no trouble there.
 */
enum flatmerge_status
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
    /**
     * Success.
     */
    FLATMERGE_STATUS_OK = 0,
    /**
     * A file could not be opened, read, written or renamed.
     */
    FLATMERGE_STATUS_IO = 1,
    /**
     * A checkpoint file is not valid safetensors.
     */
    FLATMERGE_STATUS_FORMAT = 2,
    /**
     * A tensor has a dtype flatmerge does not merge.
     */
    FLATMERGE_STATUS_UNSUPPORTED_DTYPE = 3,
    /**
     * A PyTorch pickle checkpoint, which flatmerge never loads.
     */
    FLATMERGE_STATUS_PICKLE = 4,
    /**
     * A checkpoint path holds nothing flatmerge can read.
     */
    FLATMERGE_STATUS_NOT_FOUND = 5,
    /**
     * An activation statistics file is malformed or does not fit the weights.
     */
    FLATMERGE_STATUS_STATS = 6,
    /**
     * A merge config is malformed (unknown key, wrong type, bad value).
     */
    FLATMERGE_STATUS_CONFIG = 7,
    /**
     * Names, shapes or statistics of the inputs do not fit together.
     */
    FLATMERGE_STATUS_PLAN = 8,
    /**
     * The output exists and `force` was not set.
     */
    FLATMERGE_STATUS_OUTPUT_EXISTS = 9,
    /**
     * A value is not allowed (for example a NaN where numbers are needed).
     */
    FLATMERGE_STATUS_INVALID_INPUT = 10,
    /**
     * The caller cancelled the merge; nothing was written.
     */
    FLATMERGE_STATUS_CANCELLED = 11,
    /**
     * No usable CUDA device: flatmerge was built without the `cuda`
     * feature, the driver or NVRTC library is missing, or there is no such
     * device. The message says which; kernels that fall back run on the CPU.
     */
    FLATMERGE_STATUS_NO_DEVICE = 12,
    /**
     * A CUDA call failed (allocation, copy, launch, kernel compilation).
     */
    FLATMERGE_STATUS_DEVICE = 13,
    /**
     * An error of a kind this version of the C API has no code for.
     */
    FLATMERGE_STATUS_OTHER_ERROR = 99,
    /**
     * A pointer argument that must not be NULL was NULL.
     */
    FLATMERGE_STATUS_NULL_POINTER = 100,
    /**
     * An argument is out of range: a zero or mismatched length, a length
     * whose byte size overflows, a misaligned or overlapping buffer, an
     * unknown enumeration value, a parameter outside its domain.
     */
    FLATMERGE_STATUS_INVALID_ARGUMENT = 101,
    /**
     * A string argument (a path, a name, YAML text) is not valid UTF-8.
     */
    FLATMERGE_STATUS_INVALID_UTF8 = 102,
    /**
     * flatmerge panicked: a bug, please report it with the message. The
     * call's outputs are unspecified; handles stay usable.
     */
    FLATMERGE_STATUS_PANIC = 103,
    /**
     * A handle argument is not a live handle of the expected type (freed,
     * or never returned by flatmerge). Detection is best effort.
     */
    FLATMERGE_STATUS_WRONG_HANDLE = 104,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum flatmerge_status flatmerge_status;
#else
typedef uint32_t flatmerge_status;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/**
 * Output dtypes, for the `out_dtype` field of `flatmerge_merge_options`.
 */
enum flatmerge_dtype
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
    /**
     * The config's `out_dtype` (or `dtype`); without one, each tensor
     * keeps the receiver's dtype.
     */
    FLATMERGE_DTYPE_DEFAULT = 0,
    /**
     * IEEE single precision.
     */
    FLATMERGE_DTYPE_F32 = 1,
    /**
     * IEEE half precision.
     */
    FLATMERGE_DTYPE_F16 = 2,
    /**
     * bfloat16.
     */
    FLATMERGE_DTYPE_BF16 = 3,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum flatmerge_dtype flatmerge_dtype;
#else
typedef uint32_t flatmerge_dtype;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/**
 * What a recorder writes in an example's row of a layer the example never
 * reached (`missing_rows` of `flatmerge_recorder_new`).
 */
enum flatmerge_missing_rows
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
    /**
     * A row of zeros ("no activation"): a vision layer never sees a
     * text-only example.
     */
    FLATMERGE_MISSING_ROWS_ZERO = 0,
    /**
     * Refuse to save (`FLATMERGE_STATUS_INVALID_INPUT`).
     */
    FLATMERGE_MISSING_ROWS_ERROR = 1,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum flatmerge_missing_rows flatmerge_missing_rows;
#else
typedef uint32_t flatmerge_missing_rows;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/**
 * Score forms, for the `kind` field of `flatmerge_score_form` (SPEC §1.2).
 */
enum flatmerge_score_kind
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
    /**
     * `S = |W ⊙ g'| / (1 + α·g'²)`; `param` is `α ≥ 0` (default 1).
     */
    FLATMERGE_SCORE_KIND_SAS = 0,
    /**
     * `S = |W ⊙ g'| / (g'² + ε)`; `param` is `ε > 0` (default 1e-8).
     */
    FLATMERGE_SCORE_KIND_RATIO = 1,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum flatmerge_score_kind flatmerge_score_kind;
#else
typedef uint32_t flatmerge_score_kind;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/**
 * Where a kernel ran, for the `backend` output of the CUDA kernels.
 */
enum flatmerge_backend
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
    /**
     * On the CPU (the reference): no usable CUDA device.
     */
    FLATMERGE_BACKEND_CPU = 0,
    /**
     * On a CUDA device.
     */
    FLATMERGE_BACKEND_CUDA = 1,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum flatmerge_backend flatmerge_backend;
#else
typedef uint32_t flatmerge_backend;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/**
 * An activation statistics recorder: an opaque handle made by
 * `flatmerge_recorder_new`, owned by the caller and released with
 * `flatmerge_recorder_free`.
 */
typedef struct flatmerge_recorder flatmerge_recorder;

/**
 * Where a merge is: passed to the progress callback after each tensor is
 * written. Valid only during the callback.
 */
typedef struct flatmerge_progress {
    /**
     * Tensors written so far.
     */
    size_t tensors_done;
    /**
     * Tensors in all.
     */
    size_t tensors_total;
    /**
     * Output bytes written so far.
     */
    uint64_t bytes_done;
    /**
     * Output bytes in all.
     */
    uint64_t bytes_total;
    /**
     * The tensor just written: a NUL-terminated UTF-8 string, valid only
     * during the callback.
     */
    const char *tensor;
} flatmerge_progress;

/**
 * A progress callback: called after each tensor is written with where the
 * merge is and the `user_data` of the options. Return 0 to go on, any
 * other value to cancel the merge (it then returns
 * `FLATMERGE_STATUS_CANCELLED` and leaves nothing behind; after the last
 * tensor there is nothing left to cancel, and the merge completes). It is called
 * from one of the merge's worker threads, never concurrently with itself,
 * and only before the merge function returns. It must not unwind (no C++
 * exception, no `longjmp`) through flatmerge.
 */
typedef int32_t (*flatmerge_progress_fn)(const struct flatmerge_progress *progress,
                                         void *user_data);

/**
 * How to run a merge. All-zero (`flatmerge_merge_options o = {0};` in C,
 * `flatmerge_merge_options o{};` in C++) is the default for every field,
 * and a NULL options pointer means the same.
 */
typedef struct flatmerge_merge_options {
    /**
     * Largest output shard in bytes of tensor data; 0 writes one file.
     */
    uint64_t max_shard_bytes;
    /**
     * Worker threads; 0 uses every core. The output is the same for any count.
     */
    uint32_t threads;
    /**
     * A `flatmerge_dtype`: the output dtype, overriding the config's.
     */
    uint32_t out_dtype;
    /**
     * Replace an existing output directory (only once the merge succeeded).
     */
    bool force;
    /**
     * The seed of DARE's and DELLA's random masks; NULL keeps the default (0).
     */
    const uint64_t *random_seed;
    /**
     * Called after each tensor is written; may be NULL.
     */
    flatmerge_progress_fn progress;
    /**
     * Passed to `progress` unchanged; flatmerge never reads it.
     */
    void *user_data;
    /**
     * May be NULL. Set `*cancel` to non-zero, from any thread, to stop the
     * merge before its next tensor; the merge then returns
     * `FLATMERGE_STATUS_CANCELLED` and leaves nothing behind (once the last
     * tensor is written, the merge completes). flatmerge
     * reads it with atomic loads: write it with an atomic store
     * (`__atomic_store_n(cancel, 1, __ATOMIC_RELAXED)`, C++20
     * `std::atomic_ref<int32_t>`). It must stay valid until the merge returns.
     */
    const int32_t *cancel;
} flatmerge_merge_options;

/**
 * A score form: a `flatmerge_score_kind` and its parameter.
 */
typedef struct flatmerge_score_form {
    /**
     * A `flatmerge_score_kind`.
     */
    uint32_t kind;
    /**
     * `α` for `SAS`, `ε` for `RATIO`.
     */
    float param;
} flatmerge_score_form;

/**
 * Counts of one contributor's mask (for a merge report).
 */
typedef struct flatmerge_mask_counts {
    /**
     * `|M_A|`: the receiver's elected parameters.
     */
    uint64_t receiver_elected;
    /**
     * `|M_B|`: the contributor's elected parameters.
     */
    uint64_t elected;
    /**
     * `|K|`: elected by both with opposite task-vector signs.
     */
    uint64_t conflicts;
    /**
     * `|M'_B| = |M_B| − |K|`: what the contributor gives.
     */
    uint64_t kept;
} flatmerge_mask_counts;

/**
 * One contributor's block for `flatmerge_fuse_block`: borrowed buffers of
 * the block's length.
 */
typedef struct flatmerge_block_contributor {
    /**
     * `W_B` of the block.
     */
    const float *weight;
    /**
     * Elements of `weight`.
     */
    size_t weight_len;
    /**
     * `B`'s scores over the block.
     */
    const float *scores;
    /**
     * Elements of `scores`.
     */
    size_t scores_len;
    /**
     * `B`'s threshold over its whole tensor (`flatmerge_election_threshold`).
     */
    float threshold;
    /**
     * `λ_proj` (default 1).
     */
    float lambda_proj;
    /**
     * `λ_ortho` (default 0.5).
     */
    float lambda_ortho;
} flatmerge_block_contributor;

/**
 * Election parameters of one model (SPEC §1.2).
 */
typedef struct flatmerge_election {
    /**
     * Density `k ∈ (0, 1]` (default 0.2).
     */
    double density;
    /**
     * Score form.
     */
    struct flatmerge_score_form form;
} flatmerge_election;

/**
 * One contributor for `flatmerge_merge_tensor`: borrowed buffers.
 */
typedef struct flatmerge_tensor_contributor {
    /**
     * `W_B` (or `b_B`), the receiver's shape.
     */
    const float *weight;
    /**
     * Elements of `weight`.
     */
    size_t weight_len;
    /**
     * `ȳ_B` of the layer, one value per row.
     */
    const float *y_mean;
    /**
     * Elements of `y_mean`.
     */
    size_t y_mean_len;
    /**
     * `B`'s election.
     */
    struct flatmerge_election election;
    /**
     * `λ_proj` (default 1).
     */
    float lambda_proj;
    /**
     * `λ_ortho` (default 0.5).
     */
    float lambda_ortho;
} flatmerge_tensor_contributor;

/**
 * Which CUDA device to use and how much of its memory. All zero: device
 * 0, no limit beyond its free memory.
 */
typedef struct flatmerge_cuda_options {
    /**
     * CUDA device ordinal.
     */
    uint32_t device;
    /**
     * Bytes of device memory one call may allocate; 0: the device's free
     * memory less a reserve. Larger tensors are processed in row chunks.
     */
    uint64_t memory_limit;
} flatmerge_cuda_options;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * The library version as a NUL-terminated string with static lifetime,
 * e.g. `"0.1.0"`; the caller must not free it. Thread-safe.
 */
const char *flatmerge_version(void);

/**
 * Copies the calling thread's last error message into `buf` (capacity
 * `len` bytes, NUL included) and returns the size a whole copy needs, NUL
 * included: a result greater than `len` means the copy was truncated (at
 * a UTF-8 character boundary, always NUL-terminated when `len > 0`).
 * `buf` may be NULL with `len` 0 to ask for the size.
 *
 * The message is set by every function that returns a status: the error
 * text (naming the file, tensor or argument) on failure, empty on success
 * (the result is then 1). Functions that return no status leave it
 * unchanged, except `flatmerge_recorder_free` when it detects a wrong
 * handle. Thread-safe: each thread has its own message.
 *
 * # Safety
 * A non-NULL `buf` must be valid for writes of `len` bytes.
 */
size_t flatmerge_last_error(char *buf,
                            size_t len);

/**
 * Copies a one-sentence description of the status code `status` into
 * `buf` (capacity `len` bytes, NUL included) and returns the size a whole
 * copy needs, NUL included, as `flatmerge_last_error`. An unknown code is
 * described as such. Thread-safe.
 *
 * # Safety
 * A non-NULL `buf` must be valid for writes of `len` bytes.
 */
size_t flatmerge_status_describe(uint32_t status,
                                 char *buf,
                                 size_t len);

/**
 * Merges the models of the config file at `config_path` into the
 * directory `out_dir`. Relative paths in the config are resolved against
 * the config file's directory.
 *
 * `config_path` and `out_dir` are borrowed NUL-terminated UTF-8 paths;
 * `options` is borrowed and may be NULL (defaults). The output directory
 * is written under a temporary name and renamed into place only when
 * complete: on any error nothing is left behind. Blocking; thread-safe
 * (concurrent merges into different directories are independent).
 *
 * # Safety
 * Every non-NULL pointer must be valid as documented above.
 */
flatmerge_status flatmerge_merge_file(const char *config_path,
                                      const char *out_dir,
                                      const struct flatmerge_merge_options *options);

/**
 * Merges the models of the YAML config text `yaml` into the directory
 * `out_dir`. Relative paths in the config are resolved against
 * `base_dir`, or against the current directory when `base_dir` is NULL.
 *
 * `yaml`, `base_dir` and `out_dir` are borrowed NUL-terminated UTF-8
 * strings; `options` is borrowed and may be NULL (defaults). Nothing is
 * left behind on error. Blocking; thread-safe.
 *
 * # Safety
 * Every non-NULL pointer must be valid as documented above.
 */
flatmerge_status flatmerge_merge_yaml(const char *yaml,
                                      const char *base_dir,
                                      const char *out_dir,
                                      const struct flatmerge_merge_options *options);

/**
 * Makes a recorder for one model and probe set, and stores the new handle
 * in `*recorder_out` (only on success).
 *
 * `model` and `probe` are free-form descriptions written to the file's
 * metadata (borrowed NUL-terminated UTF-8; may be empty). With
 * `max_examples = M > 0` the recorder keeps the per-example mean rows
 * `L.x_rows` / `L.y_rows` and `probe.modality` for example ids below `M`
 * (memory: about `16 × (in + out)` bytes per layer and kept example);
 * with 0 it keeps the means only. `missing_rows` is a
 * `flatmerge_missing_rows`. The caller owns the handle and must release
 * it with `flatmerge_recorder_free`. Thread-safe.
 *
 * # Safety
 * `model` and `probe` must be NULL or NUL-terminated strings;
 * `recorder_out` must be NULL or valid for a write.
 */
flatmerge_status flatmerge_recorder_new(const char *model,
                                        const char *probe,
                                        size_t max_examples,
                                        uint32_t missing_rows,
                                        struct flatmerge_recorder **recorder_out);

/**
 * Adds a batch of `rows` tokens of probe example `example_id` through
 * layer `layer` (a weight's name without `.weight`): `x` holds the
 * layer's inputs, row-major `rows × in_width` floats, and `y` its outputs
 * before any nonlinearity, `rows × out_width` floats. `modality` is the
 * example's modality (0 text, 1 vision, 2 audio, …); examples are
 * numbered 0, 1, 2, … without gaps.
 *
 * The first batch of a layer sets its widths; a later batch with other
 * widths, a NaN, infinite or too large value (beyond ±2^60), or a
 * modality that differs from an earlier push of the same example is
 * `FLATMERGE_STATUS_INVALID_INPUT`, and adds nothing. Means are summed
 * exactly, so the saved file does not depend on the order of pushes.
 *
 * All arguments are borrowed for the call. Thread-safe: any number of
 * threads may push to (and save) the same recorder at once.
 *
 * # Safety
 * `recorder` must be NULL or a pointer (live or not); `layer` NULL or a
 * NUL-terminated string; `x` and `y` NULL or valid for their lengths.
 */
flatmerge_status flatmerge_recorder_push_f32(const struct flatmerge_recorder *recorder,
                                             const char *layer,
                                             const float *x,
                                             const float *y,
                                             size_t rows,
                                             size_t in_width,
                                             size_t out_width,
                                             uint64_t example_id,
                                             uint8_t modality);

/**
 * `flatmerge_recorder_push_f32` for bfloat16 activations, given as their
 * 16-bit patterns (`uint16_t`, the upper half of an IEEE f32; e.g. a
 * PyTorch `bfloat16` tensor's storage). Same checks, same semantics, same
 * thread-safety.
 *
 * # Safety
 * As `flatmerge_recorder_push_f32`.
 */
flatmerge_status flatmerge_recorder_push_bf16(const struct flatmerge_recorder *recorder,
                                              const char *layer,
                                              const uint16_t *x,
                                              const uint16_t *y,
                                              size_t rows,
                                              size_t in_width,
                                              size_t out_width,
                                              uint64_t example_id,
                                              uint8_t modality);

/**
 * `flatmerge_recorder_push_f32` for IEEE half-precision (float16)
 * activations, given as their 16-bit patterns (`uint16_t`; e.g. a PyTorch
 * `float16` tensor's storage). Same checks, same semantics, same
 * thread-safety.
 *
 * # Safety
 * As `flatmerge_recorder_push_f32`.
 */
flatmerge_status flatmerge_recorder_push_f16(const struct flatmerge_recorder *recorder,
                                             const char *layer,
                                             const uint16_t *x,
                                             const uint16_t *y,
                                             size_t rows,
                                             size_t in_width,
                                             size_t out_width,
                                             uint64_t example_id,
                                             uint8_t modality);

/**
 * Writes the statistics recorded so far to the file `path` (SPEC §4,
 * `*.stats.safetensors`), atomically: a temporary file beside it, renamed
 * when complete. The recorder keeps recording; saving again later writes
 * the statistics then.
 *
 * `path` is a borrowed NUL-terminated UTF-8 path. Errors: an example id
 * below the row count never pushed, a missing row with
 * `FLATMERGE_MISSING_ROWS_ERROR` (`FLATMERGE_STATUS_INVALID_INPUT`), I/O
 * (`FLATMERGE_STATUS_IO`). Thread-safe, also while other threads push
 * (the file then holds some consistent subset of the concurrent pushes).
 *
 * # Safety
 * `recorder` must be NULL or a pointer (live or not); `path` NULL or a
 * NUL-terminated string.
 */
flatmerge_status flatmerge_recorder_save(const struct flatmerge_recorder *recorder,
                                         const char *path);

/**
 * Releases a recorder made by `flatmerge_recorder_new`. NULL is fine
 * (nothing happens); a pointer that is not a live recorder handle (freed
 * already, or foreign) is detected and left alone, and the calling
 * thread's last error says so — best effort: a new handle may reuse the
 * address of a freed one. It sets the last error only then: a successful
 * free leaves the last error as it was. After this call the handle must
 * not be used; pushes still running on other threads finish first (the
 * recorder's memory is released when the last of them returns). Unsaved
 * statistics are lost. Thread-safe.
 *
 * # Safety
 * `recorder` must be NULL or a pointer (live or not).
 */
void flatmerge_recorder_free(struct flatmerge_recorder *recorder);

/**
 * SAFE scores of a 2-D weight block (SPEC §1.2) with the rank-one
 * pseudo-gradient `g'[r][j] = u[r]·v[j]`, never materialised:
 * `out[r·v_len + j] = S(weight[r·v_len + j], u[r]·v[j])`.
 *
 * `weight` (`u_len × v_len` elements, row-major), `u` (`ȳ_model − ȳ_C`,
 * one per row) and `v` (`x̄_A`, one per column) are borrowed; `out`
 * (`weight_len` elements) is written only on success and must not overlap
 * the inputs. Thread-safe.
 *
 * # Safety
 * Each pointer must be valid for its length (reads; writes for `out`).
 */
flatmerge_status flatmerge_score_matrix(const float *weight,
                                        size_t weight_len,
                                        const float *u,
                                        size_t u_len,
                                        const float *v,
                                        size_t v_len,
                                        struct flatmerge_score_form form,
                                        float *out,
                                        size_t out_len);

/**
 * SAFE scores of a bias (SPEC §1.2), whose pseudo-gradient is `u` itself:
 * `out[i] = S(bias[i], u[i])`.
 *
 * `bias` and `u` are borrowed, of equal lengths; `out` (`bias_len`
 * elements) is written only on success and must not overlap the inputs.
 * Thread-safe.
 *
 * # Safety
 * Each pointer must be valid for its length (reads; writes for `out`).
 */
flatmerge_status flatmerge_score_vector(const float *bias,
                                        size_t bias_len,
                                        const float *u,
                                        size_t u_len,
                                        struct flatmerge_score_form form,
                                        float *out,
                                        size_t out_len);

/**
 * The election threshold of a whole tensor's scores at density `k`
 * (SPEC §1.2): the exact `⌈k·n − 10⁻⁶⌉`-th largest score (scores that are
 * NaN or not positive count as 0). A parameter is elected when
 * `S ≥ t ∧ S > 0`.
 *
 * `scores` is borrowed; `*threshold_out` is written only on success.
 * Thread-safe.
 *
 * # Safety
 * `scores` must be valid for `scores_len` reads, `threshold_out` for a write.
 */
flatmerge_status flatmerge_election_threshold(const float *scores,
                                              size_t scores_len,
                                              double density,
                                              float *threshold_out);

/**
 * The conflict-free mask of a contributor (SPEC §1.2), as bytes 0/1:
 * `mask[i] = M_B[i] ∧ ¬K[i]` with `M = (S ≥ t) ∧ (S > 0)` and
 * `K = M_A ∧ M_B ∧ (τ_A·τ_B < 0)`, where `τ_A = W_A − W_C` and
 * `τ_B = W_B − W_C` are the task vectors.
 *
 * All inputs are borrowed and of equal length; `mask` (same length) is
 * written only on success and must not overlap the inputs. The counts
 * for the block go to `*counts` when it is not NULL. Thread-safe.
 *
 * # Safety
 * Each pointer must be valid for its length (reads; writes for `mask`
 * and a non-NULL `counts`).
 */
flatmerge_status flatmerge_conflict_free_mask(const float *receiver_scores,
                                              size_t receiver_scores_len,
                                              float receiver_threshold,
                                              const float *contributor_scores,
                                              size_t contributor_scores_len,
                                              float contributor_threshold,
                                              const float *receiver_tau,
                                              size_t receiver_tau_len,
                                              const float *contributor_tau,
                                              size_t contributor_tau_len,
                                              uint8_t *mask,
                                              size_t mask_len,
                                              struct flatmerge_mask_counts *counts);

/**
 * The decoupled projection of rows along `d` (SPEC §1.3): for each row
 * `r` of `tau` (rows of `direction_len` elements),
 * `P[r] = (⟨τ[r], d⟩ / (⟨d, d⟩ + ε))·d` and `O[r] = τ[r] − P[r]`.
 *
 * `tau` (a whole number of rows) and `direction` are borrowed;
 * `parallel` and `orthogonal` (`tau_len` elements each) are written only
 * on success and must not overlap each other or the inputs. `epsilon > 0`
 * (SPEC default 1e-8). Thread-safe.
 *
 * # Safety
 * Each pointer must be valid for its length (reads; writes for outputs).
 */
flatmerge_status flatmerge_project_rows(const float *tau,
                                        size_t tau_len,
                                        const float *direction,
                                        size_t direction_len,
                                        float epsilon,
                                        float *parallel,
                                        size_t parallel_len,
                                        float *orthogonal,
                                        size_t orthogonal_len);

/**
 * Stages 2 and 3 of SPEC §1.2–1.5 on a block of whole rows: the
 * conflict-free masks, the masked task vectors, their decomposition along
 * `direction` and the fusion
 * `W* = W_A + Σ_k (λ_proj,k·P_k + λ_ortho,k·O_k)`, summed contributor by
 * contributor in order.
 *
 * `receiver` (`W_A`), `ancestor` (`W_C`), `receiver_scores` and each
 * contributor's `weight` and `scores` are borrowed, all of the block's
 * length. Thresholds are those of the whole tensors
 * (`flatmerge_election_threshold`). `direction` is `x̄_A` (rows of
 * `direction_len` elements) for a weight, or NULL with length 0 for a
 * bias (one row: `b* = b_A + Σ_k λ_proj,k·τ_u,k`). `epsilon > 0`. `out`
 * (the block's length) and `counts` (NULL with length 0, or one per
 * contributor; the block's counts, not added to what was there) are
 * written only on success and must not overlap the inputs. Thread-safe.
 *
 * # Safety
 * Each pointer, in the arguments and in the contributor structs, must be
 * valid for its length (reads; writes for `out` and `counts`).
 */
flatmerge_status flatmerge_fuse_block(const float *receiver,
                                      size_t receiver_len,
                                      const float *ancestor,
                                      size_t ancestor_len,
                                      const float *receiver_scores,
                                      size_t receiver_scores_len,
                                      float receiver_threshold,
                                      const struct flatmerge_block_contributor *contributors,
                                      size_t contributors_len,
                                      const float *direction,
                                      size_t direction_len,
                                      float epsilon,
                                      float *out,
                                      size_t out_len,
                                      struct flatmerge_mask_counts *counts,
                                      size_t counts_len);

/**
 * SAFE-M on one whole in-memory tensor (SPEC §1.2–1.5): scores,
 * elections, conflict-free masks, projection and fusion, as
 * `flatmerge::safe_m::merge_tensor` — the reference the streaming engine
 * is tested against.
 *
 * For a weight (`is_bias` false), `receiver`, `ancestor` and each
 * contributor's `weight` have `receiver_y_len × x_mean_len` elements
 * (row-major `[out, in]`); for a bias (`is_bias` true) `receiver_y_len`
 * elements, and `x_mean` may be NULL with length 0. `receiver_y`,
 * `ancestor_y` and each contributor's `y_mean` are mean outputs
 * (`receiver_y_len` elements); `x_mean` is the receiver's mean input
 * `x̄_A`. All inputs are borrowed. `out` (the receiver's length) and
 * `counts` (NULL with length 0, or one per contributor) are written only
 * on success and must not overlap the inputs. Thread-safe.
 *
 * # Safety
 * Each pointer, in the arguments and in the contributor structs, must be
 * valid for its length (reads; writes for `out` and `counts`).
 */
flatmerge_status flatmerge_merge_tensor(const float *receiver,
                                        size_t receiver_len,
                                        const float *receiver_y,
                                        size_t receiver_y_len,
                                        struct flatmerge_election receiver_election,
                                        const float *ancestor,
                                        size_t ancestor_len,
                                        const float *ancestor_y,
                                        size_t ancestor_y_len,
                                        const float *x_mean,
                                        size_t x_mean_len,
                                        const struct flatmerge_tensor_contributor *contributors,
                                        size_t contributors_len,
                                        bool is_bias,
                                        float epsilon,
                                        float *out,
                                        size_t out_len,
                                        struct flatmerge_mask_counts *counts,
                                        size_t counts_len);

/**
 * Whether the CUDA device of `options` (NULL: the defaults) can run the
 * kernels: `FLATMERGE_STATUS_OK`, or `FLATMERGE_STATUS_NO_DEVICE` with
 * the reason as the last error (built without the `cuda` feature, no
 * driver or NVRTC library, no such device, kernels that did not compile).
 * The first call for a device opens it and compiles the kernels with
 * NVRTC; later calls, here and in the kernels, reuse it. Thread-safe.
 *
 * # Safety
 * A non-NULL `options` must be valid for reads.
 */
flatmerge_status flatmerge_cuda_device(const struct flatmerge_cuda_options *options);

/**
 * `flatmerge_merge_tensor` on a CUDA device: the same arguments, checks
 * and results, plus `cuda` (NULL: the defaults) and `backend`. Scores,
 * masks, projection coefficients and fusion run on the device, the
 * election threshold on the host; the results are bit-identical to
 * `flatmerge_merge_tensor` (the kernels are compiled without FMA
 * contraction). Without a usable device the CPU runs it instead: the
 * status is still `FLATMERGE_STATUS_OK` and `backend` (NULL allowed)
 * receives `FLATMERGE_BACKEND_CPU`; `flatmerge_cuda_device` says why.
 * A failing CUDA call is `FLATMERGE_STATUS_DEVICE`; a `memory_limit` too
 * small for one row is `FLATMERGE_STATUS_INVALID_ARGUMENT`. Thread-safe.
 *
 * # Safety
 * As `flatmerge_merge_tensor`; a non-NULL `cuda` must be valid for reads
 * and a non-NULL `backend` for writes.
 */
flatmerge_status flatmerge_merge_tensor_cuda(const float *receiver,
                                             size_t receiver_len,
                                             const float *receiver_y,
                                             size_t receiver_y_len,
                                             struct flatmerge_election receiver_election,
                                             const float *ancestor,
                                             size_t ancestor_len,
                                             const float *ancestor_y,
                                             size_t ancestor_y_len,
                                             const float *x_mean,
                                             size_t x_mean_len,
                                             const struct flatmerge_tensor_contributor *contributors,
                                             size_t contributors_len,
                                             bool is_bias,
                                             float epsilon,
                                             float *out,
                                             size_t out_len,
                                             struct flatmerge_mask_counts *counts,
                                             size_t counts_len,
                                             const struct flatmerge_cuda_options *cuda,
                                             uint32_t *backend);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* FLATMERGE_H */
