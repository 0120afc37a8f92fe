/* Deterministic test activations shared by the C and C++ test programs and
 * mirrored in ffi/tests/common/mod.rs: multiples of 1/16 in [-30/16, 30/16],
 * exact in f32 and in bf16. */
#ifndef FLATMERGE_TESTDATA_H
#define FLATMERGE_TESTDATA_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline float fm_value(uint64_t example, uint64_t row, uint64_t col, uint64_t salt) {
    int k = (int)((example * 31u + row * 7u + col * 3u + salt * 11u) % 61u) - 30;
    return (float)k / 16.0f;
}

static inline uint16_t fm_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (uint16_t)(bits >> 16); /* exact: the low 16 bits are zero */
}

static inline uint16_t fm_f16(float value) {
    /* exact for the values above: at most 10 mantissa bits, an exponent in
     * float16's normal range, or zero */
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    if ((bits & 0x7fffffffu) == 0) {
        return sign;
    }
    uint16_t exponent = (uint16_t)(((bits >> 23) & 0xffu) - 127u + 15u);
    uint16_t mantissa = (uint16_t)((bits >> 13) & 0x3ffu);
    return (uint16_t)(sign | (uint16_t)(exponent << 10) | mantissa);
}

/* The recorder session: examples 0..4, rows 1 + e % 3, modality e % 2;
 * layer 0 (f32, 6 -> 10) sees every example, layer 1 (bf16, 10 -> 6; the
 * C session pushes its odd examples as float16) all but example 2; at most
 * 4 examples keep rows. */
#define FM_EXAMPLES 5u
#define FM_MAX_EXAMPLES 4u
#define FM_MODEL "test model"
#define FM_PROBE "test probe"
static const char *const FM_LAYERS[2] = {"model.layers.0.mlp.up_proj",
                                         "model.layers.0.mlp.down_proj"};
static const size_t FM_IN[2] = {6, 10};
static const size_t FM_OUT[2] = {10, 6};

static inline size_t fm_rows(uint64_t example) { return 1 + (size_t)(example % 3u); }
static inline uint8_t fm_modality(uint64_t example) { return (uint8_t)(example % 2u); }
static inline int fm_reaches(int layer, uint64_t example) { return layer == 0 || example != 2; }

#endif
