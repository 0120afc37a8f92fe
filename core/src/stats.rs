//! Activation statistics files (SPEC §4).
