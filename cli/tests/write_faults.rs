//! Real storage faults reach the user as one line naming the output's file,
//! and leave nothing behind: a file-size limit (`RLIMIT_FSIZE`, the kernel's
//! EFBIG, as close to a full disk as an unprivileged test gets) set on the
//! `flatmerge` process; and several `flatmerge merge --force` processes
//! racing into one output end with one complete output.

#![cfg(unix)]

use flatmerge::demo::{write_family, DemoFamily, LlamaShape};
use flatmerge::dtype::Dtype;
use flatmerge::io::Checkpoint;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const SMALL: LlamaShape = LlamaShape {
    vocab: 64,
    hidden: 32,
    intermediate: 88,
    layers: 2,
};

fn setup() -> (tempfile::TempDir, DemoFamily, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let fam = write_family(&tmp.path().join("family"), &SMALL, Dtype::BF16, 1, 9).unwrap();
    let outputs = tmp.path().join("outputs");
    std::fs::create_dir(&outputs).unwrap();
    (tmp, fam, outputs)
}

fn merge_command(fam: &DemoFamily, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flatmerge"));
    cmd.args([
        "merge",
        fam.config.to_str().unwrap(),
        out.to_str().unwrap(),
        "-q",
    ])
    .args(extra)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_file_size_limit_mid_write_is_one_line_naming_the_output_file() {
    let (_tmp, fam, outputs) = setup();
    let out = outputs.join("merged");
    let mut cmd = merge_command(&fam, &out, &[]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // Ignored, a write past the limit fails with EFBIG instead of
            // killing the process (the disposition survives exec).
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit.rlim_cur = 4096;
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let result = cmd.output().unwrap();
    assert_eq!(result.status.code(), Some(1), "{}", stderr(&result));
    let err = stderr(&result);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    let model = out.join("model.safetensors");
    let expected = format!("error: {}: ", model.display());
    assert!(lines[0].starts_with(&expected), "{err}");
    assert!(lines[0].contains("File too large"), "{err}");
    assert!(lines[0].contains("the output was not written"), "{err}");
    assert!(!out.exists());
    assert_eq!(entries(&outputs), Vec::<String>::new());
}

#[test]
fn merges_racing_into_one_output_leave_one_complete_output() {
    let (_tmp, fam, outputs) = setup();
    let reference = outputs.join("reference");
    let done = merge_command(&fam, &reference, &[]).output().unwrap();
    assert!(done.status.success(), "{}", stderr(&done));
    let want = Checkpoint::open(&reference).unwrap();
    let want: Vec<(String, Vec<u8>)> = want
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), want.view(&t.name).unwrap().data.to_vec()))
        .collect();
    std::fs::remove_dir_all(&reference).unwrap();

    let out = outputs.join("merged");
    for _round in 0..3 {
        let children: Vec<Child> = (0..3)
            .map(|_| {
                merge_command(&fam, &out, &["--force", "--threads", "1"])
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut succeeded = 0;
        for child in children {
            let result = child.wait_with_output().unwrap();
            if result.status.success() {
                succeeded += 1;
            } else {
                // The only allowed failure: the output was locked by another.
                let err = stderr(&result);
                assert!(err.contains("another merge"), "{err}");
            }
        }
        assert!(succeeded >= 1);
        let got = Checkpoint::open(&out).unwrap();
        let got: Vec<(String, Vec<u8>)> = got
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), got.view(&t.name).unwrap().data.to_vec()))
            .collect();
        assert!(got == want, "the output differs from a lone merge's");
        assert_eq!(entries(&outputs), vec!["merged".to_string()]);
    }
}
