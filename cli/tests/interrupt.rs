//! An interrupt (SIGINT, SIGTERM) during a merge ends it with exit code
//! 130, no output directory and no temporary directory left behind.

#![cfg(unix)]

use flatmerge::demo::{write_family, LlamaShape};
use flatmerge::dtype::Dtype;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn interrupt_mid_merge(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    // Large enough that the merge takes far longer than signal delivery.
    let shape = LlamaShape {
        vocab: 4096,
        hidden: 512,
        intermediate: 1376,
        layers: 8,
    };
    let family = write_family(dir.path(), &shape, Dtype::F32, 1, 0).unwrap();
    let out = dir.path().join("merged");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flatmerge"))
        .args([
            "merge",
            family.config.to_str().unwrap(),
            out.to_str().unwrap(),
            "-q",
            "--threads",
            "1",
        ])
        .spawn()
        .unwrap();
    let temp_dirs = |parent: &Path| -> Vec<String> {
        std::fs::read_dir(parent)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(".merged"))
            .collect()
    };
    // The writer's temporary directory appears before the first tensor is merged.
    let start = Instant::now();
    while temp_dirs(dir.path()).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the merge never started"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the merge ended before it could be interrupted: {status}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sent = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{signal}: {status}");
    assert!(!out.exists(), "{signal}: an output directory was left");
    assert!(
        temp_dirs(dir.path()).is_empty(),
        "{signal}: temporary files were left"
    );
}

#[test]
fn sigint_cancels_and_leaves_nothing() {
    interrupt_mid_merge("-INT");
}

#[test]
fn sigterm_cancels_and_leaves_nothing() {
    interrupt_mid_merge("-TERM");
}
