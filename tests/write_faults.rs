//! Storage faults during a merge — a disk that fills up, an fsync or a
//! rename that fails — injected through the writer (`flatmerge::io::fault`),
//! and two merges into one output: every failure names the output's file
//! (never the temporary one), leaves no output directory and no temporary
//! files, and an output that `force` was replacing survives unchanged.

use flatmerge::engine::PreparedMerge;
use flatmerge::io::fault::{self, Fault};
use flatmerge::io::{Checkpoint, OutputTensor, SafetensorsWriter, SINGLE_FILE};
use flatmerge::{dtype::Dtype, ErrorKind};
use flatmerge_suite::{dir_files, family, options, tempdir, SMALL};
use std::collections::BTreeMap;
use std::io::ErrorKind as IoKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

/// A generated family and an empty `outputs` folder, the only place the
/// injected faults apply to.
struct Setup {
    _tmp: tempfile::TempDir,
    config: PathBuf,
    outputs: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempdir();
        let fam = family(&tmp.path().join("family"), &SMALL, Dtype::BF16, 1, 5);
        let outputs = tmp.path().join("outputs");
        std::fs::create_dir(&outputs).unwrap();
        Setup {
            config: fam.config,
            outputs,
            _tmp: tmp,
        }
    }

    fn out(&self) -> PathBuf {
        self.outputs.join("merged")
    }

    fn prepared(&self) -> PreparedMerge {
        let config = flatmerge::config::MergeConfig::from_file(&self.config).unwrap();
        PreparedMerge::new(config).unwrap()
    }

    /// Runs the merge into `out()` with `fault` injected on `outputs`.
    fn merge_with(
        &self,
        fault: Option<Fault>,
        shard: Option<u64>,
        force: bool,
    ) -> flatmerge::Result<PathBuf> {
        let _guard = fault.map(|f| fault::inject(&self.outputs, f));
        let mut opts = options(&self.out(), Some(2), shard);
        opts.force = force;
        self.prepared().run(&opts).map(|s| s.out_dir)
    }

    /// Everything in `outputs`, hidden entries included.
    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.outputs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A failed merge: its error names `file` inside the output directory
    /// and says nothing was written; no output, nothing beside it.
    fn assert_clean_io_failure(
        &self,
        result: flatmerge::Result<PathBuf>,
        file: &str,
        needle: &str,
    ) {
        let e = result.expect_err("the merge should fail");
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert_eq!(e.file(), Some(self.out().join(file).as_path()), "{e}");
        let text = e.to_string();
        assert!(text.contains(needle), "`{needle}` not in: {text}");
        assert!(text.contains("the output was not written"), "{text}");
        assert!(!text.contains(".tmp-"), "names a temporary path: {text}");
        assert!(!self.out().exists(), "a failed merge created the output");
        assert_eq!(
            self.entries(),
            Vec::<String>::new(),
            "left behind after: {text}"
        );
    }
}

#[test]
fn a_disk_that_fills_up_mid_tensor_fails_naming_the_file_and_leaves_nothing() {
    let s = Setup::new();
    // Past the header, inside the tensor data (the writer buffers 1 MiB, so
    // the error surfaces at a later write or at the final flush).
    for bytes in [0, 100, 20_000] {
        let fault = Fault::Write {
            bytes,
            kind: IoKind::StorageFull,
        };
        s.assert_clean_io_failure(
            s.merge_with(Some(fault), None, false),
            SINGLE_FILE,
            "no storage space",
        );
    }
}

#[test]
fn a_full_disk_in_a_later_shard_names_that_shard() {
    let s = Setup::new();
    // Reference: the shards of a good merge and their sizes.
    let out = s.merge_with(None, Some(20_000), false).unwrap();
    let files = dir_files(&out);
    let mut shards: Vec<(&String, usize)> = files
        .iter()
        .filter(|(n, _)| n.starts_with("model-"))
        .map(|(n, b)| (n, b.len()))
        .collect();
    shards.sort();
    assert!(shards.len() >= 3, "{shards:?}");
    std::fs::remove_dir_all(&out).unwrap();
    // Room for the first shard and a little: the second one fails.
    let fault = Fault::Write {
        bytes: shards[0].1 as u64 + 10,
        kind: IoKind::StorageFull,
    };
    s.assert_clean_io_failure(
        s.merge_with(Some(fault), Some(20_000), false),
        shards[1].0,
        "no storage space",
    );
}

#[test]
fn a_write_error_after_the_weights_names_the_side_file() {
    let s = Setup::new();
    let out = s.merge_with(None, None, false).unwrap();
    let weights = std::fs::metadata(out.join(SINGLE_FILE)).unwrap().len();
    std::fs::remove_dir_all(&out).unwrap();
    // The weights fit; the first side file (config.json, …) or the report does not.
    let fault = Fault::Write {
        bytes: weights,
        kind: IoKind::PermissionDenied,
    };
    let e = s.merge_with(Some(fault), None, false).unwrap_err();
    let file = e.file().expect("the error names a file").to_path_buf();
    assert_eq!(file.parent(), Some(s.out().as_path()), "{e}");
    assert_ne!(file.file_name().unwrap(), SINGLE_FILE, "{e}");
    s.assert_clean_io_failure(
        Err(e),
        file.file_name().unwrap().to_str().unwrap(),
        "permission denied",
    );
}

#[test]
fn a_failed_fsync_fails_the_merge() {
    let s = Setup::new();
    let fault = Fault::Sync {
        kind: IoKind::Other,
    };
    s.assert_clean_io_failure(s.merge_with(Some(fault), None, false), SINGLE_FILE, "fsync");
}

#[test]
fn a_failed_final_rename_keeps_the_output_force_was_replacing() {
    let s = Setup::new();
    let out = s.merge_with(None, None, false).unwrap();
    // Mark the old output so that a swap would show.
    std::fs::write(out.join("merge_report.json"), b"{\"old\": true}").unwrap();
    let before = dir_files(&out);
    let fault = Fault::Rename {
        kind: IoKind::Other,
    };
    let e = s.merge_with(Some(fault), None, true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.to_string().contains("rename"), "{e}");
    assert_eq!(dir_files(&out), before, "the old output changed: {e}");
    assert_eq!(s.entries(), vec!["merged".to_string()], "{e}");
}

#[test]
fn faults_are_scoped_to_their_directory_and_removed_with_their_guard() {
    let s = Setup::new();
    let elsewhere = tempdir();
    {
        let _full = fault::inject(
            elsewhere.path(),
            Fault::Write {
                bytes: 0,
                kind: IoKind::StorageFull,
            },
        );
        s.merge_with(None, None, false).unwrap();
    }
    std::fs::remove_dir_all(s.out()).unwrap();
    drop(fault::inject(
        &s.outputs,
        Fault::Write {
            bytes: 0,
            kind: IoKind::StorageFull,
        },
    ));
    s.merge_with(None, None, false).unwrap();
    Checkpoint::open(&s.out()).unwrap();
}

/// `/dev/full` answers every write with ENOSPC: the real error of a full
/// disk reaches the caller through the writer's buffer, naming the file.
#[cfg(target_os = "linux")]
#[test]
fn a_real_enospc_from_dev_full_is_reported_naming_the_file() {
    let path = Path::new("/dev/full");
    if std::fs::OpenOptions::new().write(true).open(path).is_err() {
        eprintln!("skipped: /dev/full cannot be opened for writing here");
        return;
    }
    let tensors = [OutputTensor::new("w", Dtype::F32, vec![4])];
    let result = SafetensorsWriter::create(path, &tensors, &BTreeMap::new()).and_then(|mut w| {
        w.write_tensor("w", &[0u8; 16])?;
        w.finish()
    });
    let e = result.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert_eq!(e.file(), Some(path), "{e}");
    assert!(e.to_string().contains("No space left on device"), "{e}");
}

#[test]
fn a_second_merge_into_an_output_being_written_fails_at_once() {
    let s = Setup::new();
    let reference = s.outputs.join("reference");
    s.prepared()
        .run(&options(&reference, Some(1), None))
        .unwrap();
    let expected = dir_files(&reference);
    std::fs::remove_dir_all(&reference).unwrap();

    // The first merge stops after its first tensor until told to go on.
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let started_tx = std::sync::Mutex::new(Some(started_tx));
    let go_rx = std::sync::Mutex::new(go_rx);
    let once = AtomicBool::new(false);
    let pause = |_: &flatmerge::engine::Progress<'_>| {
        if !once.swap(true, Ordering::SeqCst) {
            if let Some(tx) = started_tx.lock().unwrap().take() {
                tx.send(()).unwrap();
            }
            go_rx.lock().unwrap().recv().unwrap();
        }
    };
    std::thread::scope(|scope| {
        let first = scope.spawn(|| {
            let mut opts = options(&s.out(), Some(1), None);
            opts.progress = Some(&pause);
            s.prepared().run(&opts)
        });
        started_rx.recv().unwrap();
        for force in [false, true] {
            let e = s.merge_with(None, None, force).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::OutputExists, "{e}");
            assert_eq!(e.file(), Some(s.out().as_path()), "{e}");
            let text = e.to_string();
            assert!(
                text.contains("another merge")
                    && text.contains(&format!("process {}", std::process::id()))
                    && text.contains(".merged.lock"),
                "force {force}: {text}"
            );
        }
        go_tx.send(()).unwrap();
        first.join().unwrap().unwrap();
    });
    // The first merge is complete and untouched by the refused ones.
    let mut got = dir_files(&s.out());
    let mut want = expected;
    // The reports name their own output directory; everything else is equal.
    got.remove("merge_report.json");
    want.remove("merge_report.json");
    assert_eq!(got, want);
    assert_eq!(s.entries(), vec!["merged".to_string()]);
    // The lock went with the first merge: a new one may replace its output.
    s.merge_with(None, None, true).unwrap();
}

#[test]
fn a_lock_file_left_by_a_killed_merge_does_not_block_the_next_one() {
    let s = Setup::new();
    // What a merge killed with SIGKILL leaves: the file, no lock on it.
    std::fs::write(s.outputs.join(".merged.lock"), b"999999").unwrap();
    if cfg!(unix) {
        s.merge_with(None, None, false).unwrap();
        assert_eq!(s.entries(), vec!["merged".to_string()]);
    } else {
        let e = s.merge_with(None, None, false).unwrap_err();
        assert!(e.to_string().contains("remove it"), "{e}");
    }
}

#[test]
fn the_lock_is_released_when_a_merge_fails_early() {
    let s = Setup::new();
    std::fs::create_dir(s.out()).unwrap();
    std::fs::write(s.out().join("notes.txt"), b"mine").unwrap();
    // Refused (exists, not a model), and again: the lock was released.
    for _ in 0..2 {
        let e = s.merge_with(None, None, true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutputExists, "{e}");
        assert!(e.to_string().contains("holds no model"), "{e}");
    }
    assert_eq!(s.entries(), vec!["merged".to_string()]);
}
