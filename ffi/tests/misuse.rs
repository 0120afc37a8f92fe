//! Misuse of the C API from C — NULL pointers, zero, mismatched and
//! overflowing lengths, invalid UTF-8, bad enumeration values, overlapping
//! buffers, freed and foreign handles, a double free, callbacks and flags
//! that cancel — each gets its status code and a message, never a crash
//! (`ffi/c/misuse.c` checks each case and prints one line per case).

mod common;

use common::{compile, family, run, Link};

#[test]
fn every_misuse_gets_a_status_and_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let fam = family(&dir.path().join("family"));
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let exe = compile(&["misuse.c"], "misuse", Link::Shared, dir.path());
    let output = run(&exe, &[&fam.config, &work]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(stdout.trim_end().ends_with("0 failed"), "{stdout}");
    let cases = stdout.lines().filter(|l| l.starts_with("ok ")).count();
    assert!(cases >= 80, "only {cases} cases ran:\n{stdout}");
    for needle in [
        "ok callback cancels",
        "ok push to a freed handle",
        "ok double free reported",
        "ok merge_file invalid UTF-8 path",
        "ok score_matrix overflowing length",
    ] {
        assert!(stdout.contains(needle), "{needle} missing:\n{stdout}");
    }
}
