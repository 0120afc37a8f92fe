/* Merges the models of a flatmerge config into a directory, printing
 * progress, and prints the error message when the merge fails.
 * Build: cc example.c $(pkg-config --cflags --libs flatmerge) -o example
 * Run:   ./example config.yaml merged/ */
#include <flatmerge.h>
#include <stdio.h>

static int32_t on_progress(const flatmerge_progress *p, void *user_data) {
    (void)user_data;
    fprintf(stderr, "\r%zu/%zu tensors: %s", p->tensors_done, p->tensors_total, p->tensor);
    return 0; /* non-zero cancels the merge */
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s CONFIG.yaml OUT_DIR\n", argv[0]);
        return 2;
    }
    printf("flatmerge %s\n", flatmerge_version());

    flatmerge_merge_options options = {0}; /* all zero: the defaults */
    options.threads = 2;                   /* 0 would use every core */
    options.progress = on_progress;

    flatmerge_status status = flatmerge_merge_file(argv[1], argv[2], &options);
    fprintf(stderr, "\n");
    if (status != FLATMERGE_STATUS_OK) {
        char message[512];
        flatmerge_last_error(message, sizeof message); /* truncated if longer */
        fprintf(stderr, "merge failed (status %u): %s\n", (unsigned)status, message);
        return 1;
    }
    printf("merged into %s\n", argv[2]);
    return 0;
}
