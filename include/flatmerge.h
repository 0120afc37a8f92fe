/* flatmerge C ABI. Kept in sync with ffi/src/lib.rs. */
#ifndef FLATMERGE_H
#define FLATMERGE_H

#ifdef __cplusplus
extern "C" {
#endif

/* The library version, e.g. "0.1.0": a static NUL-terminated string that
 * the caller must not free. Thread-safe. */
const char *flatmerge_version(void);

#ifdef __cplusplus
}
#endif

#endif /* FLATMERGE_H */
