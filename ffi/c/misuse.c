/* Misuse of the C API: every case must give its status code and a message,
 * never a crash. Prints one line per case; exits 1 if any case failed.
 * Usage: misuse CONFIG.yaml WORK_DIR */
#include <flatmerge.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int failures = 0;

/* Checks that `status` is `expected` and that the last error contains `needle`. */
static void expect(const char *name, flatmerge_status status, flatmerge_status expected,
                   const char *needle) {
    char message[2048];
    size_t needed = flatmerge_last_error(message, sizeof message);
    int ok = status == expected && needed == strlen(message) + 1 &&
             (expected == FLATMERGE_STATUS_OK ? message[0] == '\0'
                                              : strstr(message, needle) != NULL);
    printf("%s %s: status %u (expected %u): %s\n", ok ? "ok" : "FAIL", name, (unsigned)status,
           (unsigned)expected, message);
    failures += !ok;
}

static void expect_true(const char *name, int ok) {
    printf("%s %s\n", ok ? "ok" : "FAIL", name);
    failures += !ok;
}

static int exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

static int32_t cancel_after_first(const flatmerge_progress *p, void *user_data) {
    (void)p;
    ++*(int *)user_data;
    return 1;
}

static int32_t set_flag(const flatmerge_progress *p, void *user_data) {
    (void)p;
    __atomic_store_n((int32_t *)user_data, 1, __ATOMIC_RELAXED);
    return 0;
}

static void merges(const char *config, const char *work) {
    char out[4096], cancelled[4096];
    snprintf(out, sizeof out, "%s/out", work);
    snprintf(cancelled, sizeof cancelled, "%s/cancelled", work);
    flatmerge_merge_options options = {0};

    expect("merge_file NULL config", flatmerge_merge_file(NULL, out, NULL),
           FLATMERGE_STATUS_NULL_POINTER, "`config_path` is NULL");
    expect("merge_file NULL out_dir", flatmerge_merge_file(config, NULL, NULL),
           FLATMERGE_STATUS_NULL_POINTER, "`out_dir` is NULL");
    expect("merge_file empty out_dir", flatmerge_merge_file(config, "", NULL),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`out_dir` is an empty string");
    expect("merge_file invalid UTF-8 path", flatmerge_merge_file("\xff\xfe.yaml", out, NULL),
           FLATMERGE_STATUS_INVALID_UTF8, "`config_path` is not valid UTF-8");
    expect("merge_file invalid UTF-8 out_dir", flatmerge_merge_file(config, "out\xc3(", NULL),
           FLATMERGE_STATUS_INVALID_UTF8, "`out_dir` is not valid UTF-8");
    expect("merge_file missing config", flatmerge_merge_file("/nonexistent/c.yaml", out, NULL),
           FLATMERGE_STATUS_IO, "/nonexistent/c.yaml");
    expect("merge_yaml NULL yaml", flatmerge_merge_yaml(NULL, NULL, out, NULL),
           FLATMERGE_STATUS_NULL_POINTER, "`yaml` is NULL");
    expect("merge_yaml bad YAML", flatmerge_merge_yaml("merge_method: [", NULL, out, NULL),
           FLATMERGE_STATUS_CONFIG, "line");
    expect("merge_yaml unknown method",
           flatmerge_merge_yaml("merge_method: frobnicate\n", NULL, out, NULL),
           FLATMERGE_STATUS_CONFIG, "frobnicate");
    expect("merge_yaml invalid UTF-8 base_dir",
           flatmerge_merge_yaml("merge_method: safe_m\n", "\x80", out, NULL),
           FLATMERGE_STATUS_INVALID_UTF8, "`base_dir`");
    options.out_dtype = 99;
    expect("merge_file unknown dtype", flatmerge_merge_file(config, out, &options),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`options.out_dtype` is 99");
    options.out_dtype = FLATMERGE_DTYPE_DEFAULT;

    /* A callback that cancels: nothing is left behind. */
    int calls = 0;
    options.progress = cancel_after_first;
    options.user_data = &calls;
    expect("callback cancels", flatmerge_merge_file(config, cancelled, &options),
           FLATMERGE_STATUS_CANCELLED, "cancelled");
    expect_true("callback called once, nothing left behind", calls == 1 && !exists(cancelled));

    /* The cancel flag, set before the merge and from the callback. */
    int32_t flag = 1;
    options.progress = NULL;
    options.user_data = NULL;
    options.cancel = &flag;
    expect("cancel flag set", flatmerge_merge_file(config, cancelled, &options),
           FLATMERGE_STATUS_CANCELLED, "cancelled");
    flag = 0;
    options.progress = set_flag;
    options.user_data = &flag;
    expect("cancel flag set during the merge", flatmerge_merge_file(config, cancelled, &options),
           FLATMERGE_STATUS_CANCELLED, "cancelled");
    expect_true("nothing left behind", !exists(cancelled));
    options.progress = NULL;
    options.user_data = NULL;
    options.cancel = NULL;

    /* An existing output needs force. */
    expect("merge succeeds", flatmerge_merge_file(config, out, &options), FLATMERGE_STATUS_OK, "");
    expect("output exists", flatmerge_merge_file(config, out, &options),
           FLATMERGE_STATUS_OUTPUT_EXISTS, out);
    options.force = true;
    expect("force replaces", flatmerge_merge_file(config, out, &options), FLATMERGE_STATUS_OK, "");
}

static void kernels(void) {
    float w[6] = {1, 2, 3, 4, 5, 6}, u[2] = {1, -1}, v[3] = {0.5f, 1, 2};
    float out[6] = {42, 42, 42, 42, 42, 42};
    flatmerge_score_form sas = {FLATMERGE_SCORE_KIND_SAS, 1.0f};

    expect("score_matrix NULL weight",
           flatmerge_score_matrix(NULL, 6, u, 2, v, 3, sas, out, 6),
           FLATMERGE_STATUS_NULL_POINTER, "`weight` is NULL");
    expect("score_matrix NULL out", flatmerge_score_matrix(w, 6, u, 2, v, 3, sas, NULL, 6),
           FLATMERGE_STATUS_NULL_POINTER, "`out` is NULL");
    expect("score_matrix zero length", flatmerge_score_matrix(w, 0, u, 2, v, 3, sas, out, 6),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`weight` has length 0");
    expect("score_matrix mismatched lengths",
           flatmerge_score_matrix(w, 6, u, 2, v, 2, sas, out, 6),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`weight` has length 6, expected 4");
    expect("score_matrix short output", flatmerge_score_matrix(w, 6, u, 2, v, 3, sas, out, 5),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`out` has length 5, expected 6");
    expect("score_matrix overflowing length",
           flatmerge_score_matrix(w, 6, u, SIZE_MAX / 2, v, 3, sas, out, 6),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "overflows");
    expect("score_matrix output overlaps input",
           flatmerge_score_matrix(w, 6, u, 2, v, 3, sas, w, 6),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`out` overlaps `weight`");
    expect("score_matrix misaligned",
           flatmerge_score_matrix((const float *)((const char *)w + 1), 4, u, 2, v, 2, sas, out,
                                  4),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "not aligned");
    flatmerge_score_form bad_kind = {7, 1.0f}, bad_alpha = {FLATMERGE_SCORE_KIND_SAS, -1.0f},
                         bad_eps = {FLATMERGE_SCORE_KIND_RATIO, 0.0f};
    expect("score_matrix unknown form", flatmerge_score_matrix(w, 6, u, 2, v, 3, bad_kind, out, 6),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`form.kind` is 7");
    expect("score_matrix negative alpha",
           flatmerge_score_matrix(w, 6, u, 2, v, 3, bad_alpha, out, 6),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "≥ 0");
    expect("score_vector zero epsilon", flatmerge_score_vector(w, 2, u, 2, bad_eps, out, 2),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`form.param`");
    expect("score_vector mismatched", flatmerge_score_vector(w, 3, u, 2, sas, out, 3),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`u` has length 2, expected 3");
    int untouched = 1;
    for (int i = 0; i < 6; i++) untouched &= out[i] == 42;
    expect_true("outputs untouched by failed calls", untouched);

    float t = 42;
    expect("threshold zero density", flatmerge_election_threshold(w, 6, 0.0, &t),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "density in (0, 1]");
    expect("threshold NaN density", flatmerge_election_threshold(w, 6, NAN, &t),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "density");
    expect("threshold NULL out", flatmerge_election_threshold(w, 6, 0.5, NULL),
           FLATMERGE_STATUS_NULL_POINTER, "`threshold_out` is NULL");
    expect_true("threshold untouched", t == 42);
    expect("threshold ok", flatmerge_election_threshold(w, 6, 0.5, &t), FLATMERGE_STATUS_OK, "");
    expect_true("threshold is the 3rd largest", t == 4);

    uint8_t mask[6];
    expect("mask mismatched", flatmerge_conflict_free_mask(w, 6, 1, w, 6, 1, w, 5, w, 6, mask, 6,
                                                           NULL),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`receiver_tau` has length 5");
    expect("mask NaN threshold", flatmerge_conflict_free_mask(w, 6, NAN, w, 6, 1, w, 6, w, 6, mask,
                                                              6, NULL),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`receiver_threshold` is NaN");

    float p[6], o[6];
    expect("project_rows partial row", flatmerge_project_rows(w, 6, v, 4, 1e-8f, p, 6, o, 6),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "whole number of rows");
    expect("project_rows outputs overlap", flatmerge_project_rows(w, 6, v, 3, 1e-8f, p, 6, p, 6),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`parallel` overlaps `orthogonal`");
    expect("project_rows zero epsilon", flatmerge_project_rows(w, 6, v, 3, 0.0f, p, 6, o, 6),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`epsilon`");

    float fused[6];
    flatmerge_mask_counts counts[2];
    flatmerge_block_contributor c = {w, 6, w, 6, 1.0f, 1.0f, 0.5f};
    expect("fuse_block no contributors",
           flatmerge_fuse_block(w, 6, w, 6, w, 6, 1, &c, 0, v, 3, 1e-8f, fused, 6, NULL, 0),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`contributors` has length 0");
    expect("fuse_block direction NULL with a length",
           flatmerge_fuse_block(w, 6, w, 6, w, 6, 1, &c, 1, NULL, 3, 1e-8f, fused, 6, NULL, 0),
           FLATMERGE_STATUS_NULL_POINTER, "`direction` is NULL");
    expect("fuse_block counts length",
           flatmerge_fuse_block(w, 6, w, 6, w, 6, 1, &c, 1, v, 3, 1e-8f, fused, 6, counts, 2),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`counts` has length 2, expected 1");
    flatmerge_block_contributor bad = {NULL, 6, w, 6, 1.0f, 1.0f, 0.5f};
    expect("fuse_block NULL in a contributor",
           flatmerge_fuse_block(w, 6, w, 6, w, 6, 1, &bad, 1, v, 3, 1e-8f, fused, 6, NULL, 0),
           FLATMERGE_STATUS_NULL_POINTER, "`contributors[].weight` is NULL");
    flatmerge_block_contributor inf = {w, 6, w, 6, 1.0f, INFINITY, 0.5f};
    expect("fuse_block infinite lambda",
           flatmerge_fuse_block(w, 6, w, 6, w, 6, 1, &inf, 1, v, 3, 1e-8f, fused, 6, NULL, 0),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "lambda_proj");

    flatmerge_election e = {0.5, sas};
    flatmerge_tensor_contributor tc = {w, 6, u, 2, e, 1.0f, 0.5f};
    expect("merge_tensor weight without x_mean",
           flatmerge_merge_tensor(w, 6, u, 2, e, w, 6, u, 2, NULL, 0, &tc, 1, false, 1e-8f, fused,
                                  6, NULL, 0),
           FLATMERGE_STATUS_NULL_POINTER, "`x_mean` is NULL");
    flatmerge_election bad_density = {1.5, sas};
    expect("merge_tensor bad density",
           flatmerge_merge_tensor(w, 6, u, 2, bad_density, w, 6, u, 2, v, 3, &tc, 1, false, 1e-8f,
                                  fused, 6, NULL, 0),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`receiver_election.density` is 1.5");
    expect("merge_tensor ok",
           flatmerge_merge_tensor(w, 6, u, 2, e, w, 6, u, 2, v, 3, &tc, 1, false, 1e-8f, fused, 6,
                                  counts, 1),
           FLATMERGE_STATUS_OK, "");
}

static void recorder(const char *work) {
    flatmerge_recorder *r = NULL;
    float x[4] = {1, 2, 3, 4}, y[2] = {1, 2}, nan_x[4] = {1, NAN, 3, 4};
    char path[4096];
    snprintf(path, sizeof path, "%s/stats.safetensors", work);

    expect("recorder_new NULL out", flatmerge_recorder_new("m", "p", 4, 0, NULL),
           FLATMERGE_STATUS_NULL_POINTER, "`recorder_out` is NULL");
    expect("recorder_new NULL model", flatmerge_recorder_new(NULL, "p", 4, 0, &r),
           FLATMERGE_STATUS_NULL_POINTER, "`model` is NULL");
    expect("recorder_new bad missing_rows", flatmerge_recorder_new("m", "p", 4, 5, &r),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`missing_rows` is 5");
    expect("recorder_new invalid UTF-8", flatmerge_recorder_new("m\xff", "p", 4, 0, &r),
           FLATMERGE_STATUS_INVALID_UTF8, "`model`");
    expect_true("no handle on failure", r == NULL);
    expect("recorder_new", flatmerge_recorder_new("m", "p", 4, FLATMERGE_MISSING_ROWS_ERROR, &r),
           FLATMERGE_STATUS_OK, "");

    expect("push NULL recorder", flatmerge_recorder_push_f32(NULL, "l", x, y, 2, 2, 1, 0, 0),
           FLATMERGE_STATUS_NULL_POINTER, "`recorder` is NULL");
    expect("push NULL layer", flatmerge_recorder_push_f32(r, NULL, x, y, 2, 2, 1, 0, 0),
           FLATMERGE_STATUS_NULL_POINTER, "`layer` is NULL");
    expect("push invalid UTF-8 layer", flatmerge_recorder_push_f32(r, "l\xe2\x82", x, y, 2, 2, 1,
                                                                   0, 0),
           FLATMERGE_STATUS_INVALID_UTF8, "`layer` is not valid UTF-8");
    expect("push NULL x", flatmerge_recorder_push_f32(r, "l", NULL, y, 2, 2, 1, 0, 0),
           FLATMERGE_STATUS_NULL_POINTER, "`x` is NULL");
    expect("push zero rows", flatmerge_recorder_push_f32(r, "l", x, y, 0, 2, 1, 0, 0),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "`rows` is 0");
    expect("push overflowing shape",
           flatmerge_recorder_push_f32(r, "l", x, y, SIZE_MAX / 2, 4, 1, 0, 0),
           FLATMERGE_STATUS_INVALID_ARGUMENT, "overflows");
    expect("push NaN", flatmerge_recorder_push_f32(r, "l", nan_x, y, 2, 2, 1, 0, 0),
           FLATMERGE_STATUS_INVALID_INPUT, "NaN");
    expect("push", flatmerge_recorder_push_f32(r, "l", x, y, 2, 2, 1, 0, 0), FLATMERGE_STATUS_OK,
           "");
    expect("push other widths", flatmerge_recorder_push_f32(r, "l", x, y, 1, 4, 2, 1, 0),
           FLATMERGE_STATUS_INVALID_INPUT, "width");
    expect("push other modality", flatmerge_recorder_push_f32(r, "l", x, y, 2, 2, 1, 0, 1),
           FLATMERGE_STATUS_INVALID_INPUT, "modality");
    uint16_t xb[2] = {0x3f80, 0x4000}, yb[1] = {0x3f80};
    expect("push bf16 to another layer", flatmerge_recorder_push_bf16(r, "k", xb, yb, 1, 2, 1, 1, 1),
           FLATMERGE_STATUS_OK, "");
    expect("save NULL path", flatmerge_recorder_save(r, NULL), FLATMERGE_STATUS_NULL_POINTER,
           "`path` is NULL");
    expect("save missing row with MISSING_ROWS_ERROR", flatmerge_recorder_save(r, path),
           FLATMERGE_STATUS_INVALID_INPUT, "never reached this layer");
    expect("push the missing rows", flatmerge_recorder_push_f32(r, "l", x, y, 2, 2, 1, 1, 1),
           FLATMERGE_STATUS_OK, "");
    expect("push the missing rows (bf16)",
           flatmerge_recorder_push_bf16(r, "k", xb, yb, 1, 2, 1, 0, 0), FLATMERGE_STATUS_OK, "");
    expect("save into a missing directory",
           flatmerge_recorder_save(r, "/nonexistent/dir/stats.safetensors"), FLATMERGE_STATUS_IO,
           "/nonexistent/dir");
    expect("save", flatmerge_recorder_save(r, path), FLATMERGE_STATUS_OK, "");
    expect_true("saved", exists(path));

    /* A pointer that was never a handle, then a freed one. */
    int not_a_handle = 0;
    expect("push to a foreign pointer",
           flatmerge_recorder_push_f32((const flatmerge_recorder *)&not_a_handle, "l", x, y, 2, 2,
                                       1, 0, 0),
           FLATMERGE_STATUS_WRONG_HANDLE, "not a live flatmerge_recorder");
    flatmerge_recorder_free(r);
    expect("push to a freed handle", flatmerge_recorder_push_f32(r, "l", x, y, 2, 2, 1, 0, 0),
           FLATMERGE_STATUS_WRONG_HANDLE, "not a live flatmerge_recorder");
    expect("save a freed handle", flatmerge_recorder_save(r, path), FLATMERGE_STATUS_WRONG_HANDLE,
           "freed");
    flatmerge_recorder_free(r); /* a double free is detected and ignored */
    char message[256];
    flatmerge_last_error(message, sizeof message);
    expect_true("double free reported", strstr(message, "freed twice") != NULL);
    flatmerge_recorder_free(NULL);
    expect_true("free NULL leaves the last error", strstr(message, "freed twice") != NULL);
}

static void errors(void) {
    /* Truncation: the size needed is returned, the copy is NUL-terminated. */
    flatmerge_status s = flatmerge_merge_file(NULL, NULL, NULL);
    char small[8];
    memset(small, 'x', sizeof small);
    size_t needed = flatmerge_last_error(small, sizeof small);
    expect_true("last_error truncates", s == FLATMERGE_STATUS_NULL_POINTER &&
                                            needed == strlen("`config_path` is NULL") + 1 &&
                                            strcmp(small, "`config") == 0);
    expect_true("last_error with NULL buffer", flatmerge_last_error(NULL, 0) == needed);
    char text[128];
    size_t n = flatmerge_status_describe(FLATMERGE_STATUS_WRONG_HANDLE, text, sizeof text);
    expect_true("describe", n == strlen(text) + 1 && strstr(text, "handle") != NULL);
    flatmerge_status_describe(12345, text, sizeof text);
    expect_true("describe unknown", strstr(text, "unknown status code 12345") != NULL);
    for (uint32_t code = 0; code < 200; code++) {
        flatmerge_status_describe(code, text, sizeof text);
    }
    /* Success clears the message. */
    float t;
    float scores[2] = {1, 2};
    expect("success clears", flatmerge_election_threshold(scores, 2, 1.0, &t),
           FLATMERGE_STATUS_OK, "");
    expect_true("version", strlen(flatmerge_version()) > 0);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s CONFIG.yaml WORK_DIR\n", argv[0]);
        return 2;
    }
    merges(argv[1], argv[2]);
    kernels();
    recorder(argv[2]);
    errors();
    printf("%d failed\n", failures);
    return failures == 0 ? 0 : 1;
}
