/* A C session: merge from in-memory YAML with every option set, then a
 * recorder session with f32 and bf16 batches pushed in reverse order.
 * Usage: session CONFIG.yaml BASE_DIR OUT_DIR STATS_PATH */
#include <flatmerge.h>
#include <stdio.h>
#include <stdlib.h>

#include "testdata.h"

#define CHECK(call)                                                                  \
    do {                                                                             \
        flatmerge_status status_ = (call);                                           \
        if (status_ != FLATMERGE_STATUS_OK) {                                        \
            char message_[1024];                                                     \
            flatmerge_last_error(message_, sizeof message_);                        \
            fprintf(stderr, "%s:%d: %s failed with %u: %s\n", __FILE__, __LINE__, #call, \
                    (unsigned)status_, message_);                                   \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

struct progress_state {
    size_t calls;
    uint64_t last_bytes;
    int ok;
};

static int32_t on_progress(const flatmerge_progress *p, void *user_data) {
    struct progress_state *state = (struct progress_state *)user_data;
    state->calls++;
    if (p->tensors_done != state->calls || p->bytes_done < state->last_bytes ||
        p->bytes_done > p->bytes_total || p->tensors_done > p->tensors_total ||
        p->tensor == NULL || p->tensor[0] == '\0') {
        state->ok = 0;
    }
    state->last_bytes = p->bytes_done;
    return 0;
}

static char *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        perror(path);
        exit(1);
    }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc((size_t)size + 1);
    if (text == NULL || fread(text, 1, (size_t)size, f) != (size_t)size) {
        exit(1);
    }
    text[size] = '\0';
    fclose(f);
    return text;
}

static void push(const flatmerge_recorder *recorder, int layer, uint64_t e) {
    size_t rows = fm_rows(e), in = FM_IN[layer], out = FM_OUT[layer];
    float *x = malloc(rows * in * sizeof(float));
    float *y = malloc(rows * out * sizeof(float));
    uint16_t *xb = malloc(rows * in * sizeof(uint16_t));
    uint16_t *yb = malloc(rows * out * sizeof(uint16_t));
    /* Odd examples of layer 1 go in as float16: the same values, so the
     * file must be the Rust session's bit for bit. */
    int half = layer == 1 && e % 2 == 1;
    for (size_t r = 0; r < rows; r++) {
        for (size_t j = 0; j < in; j++) {
            x[r * in + j] = fm_value(e, r, j, 2 * (uint64_t)layer);
            xb[r * in + j] = half ? fm_f16(x[r * in + j]) : fm_bf16(x[r * in + j]);
        }
        for (size_t j = 0; j < out; j++) {
            y[r * out + j] = fm_value(e, r, j, 2 * (uint64_t)layer + 1);
            yb[r * out + j] = half ? fm_f16(y[r * out + j]) : fm_bf16(y[r * out + j]);
        }
    }
    if (layer == 0) {
        CHECK(flatmerge_recorder_push_f32(recorder, FM_LAYERS[layer], x, y, rows, in, out, e,
                                          fm_modality(e)));
    } else if (half) {
        CHECK(flatmerge_recorder_push_f16(recorder, FM_LAYERS[layer], xb, yb, rows, in, out, e,
                                          fm_modality(e)));
    } else {
        CHECK(flatmerge_recorder_push_bf16(recorder, FM_LAYERS[layer], xb, yb, rows, in, out, e,
                                           fm_modality(e)));
    }
    free(x);
    free(y);
    free(xb);
    free(yb);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s CONFIG.yaml BASE_DIR OUT_DIR STATS_PATH\n", argv[0]);
        return 2;
    }
    char *yaml = read_file(argv[1]);
    struct progress_state state = {0, 0, 1};
    int32_t cancel = 0;
    uint64_t seed = 7;
    flatmerge_merge_options options = {0};
    options.max_shard_bytes = 20000;
    options.threads = 1;
    options.out_dtype = FLATMERGE_DTYPE_F32;
    options.force = true;
    options.random_seed = &seed;
    options.progress = on_progress;
    options.user_data = &state;
    options.cancel = &cancel;
    CHECK(flatmerge_merge_yaml(yaml, argv[2], argv[3], &options));
    free(yaml);
    if (!state.ok || state.calls == 0) {
        fprintf(stderr, "progress was not monotonic (%zu calls)\n", state.calls);
        return 1;
    }
    printf("progress calls: %zu\n", state.calls);

    flatmerge_recorder *recorder = NULL;
    CHECK(flatmerge_recorder_new(FM_MODEL, FM_PROBE, FM_MAX_EXAMPLES,
                                 FLATMERGE_MISSING_ROWS_ZERO, &recorder));
    for (uint64_t e = FM_EXAMPLES; e-- > 0;) {
        for (int layer = 1; layer >= 0; layer--) {
            if (fm_reaches(layer, e)) {
                push(recorder, layer, e);
            }
        }
    }
    CHECK(flatmerge_recorder_save(recorder, argv[4]));
    flatmerge_recorder_free(recorder);
    printf("session ok\n");
    return 0;
}
