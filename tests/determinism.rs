//! A merge's output does not depend on the thread count, nor on the run:
//! the same inputs give the same bytes, file for file (weights and report).

use flatmerge::dtype::Dtype;
use flatmerge::engine::PreparedMerge;
use flatmerge_suite::{
    config, dir_files, family, options, read_tensors, tempdir, CHUNKED, ENGINE_CHUNK_ELEMENTS,
    SMALL,
};

#[test]
fn one_and_two_threads_write_identical_bytes_and_reruns_too() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("family"), &CHUNKED, Dtype::BF16, 2, 7);
    // The shape must make the engine split tensors, or threads cannot differ.
    let largest = CHUNKED
        .tensors()
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>())
        .max()
        .unwrap();
    assert!(
        largest > ENGINE_CHUNK_ELEMENTS,
        "fixture too small to be chunked"
    );

    let prepared = PreparedMerge::new(config(&fam)).unwrap();
    let run = |name: &str, threads: usize| {
        let out = tmp.path().join(name);
        prepared.run(&options(&out, Some(threads), None)).unwrap();
        dir_files(&out)
    };
    let one = run("t1", 1);
    let two = run("t2", 2);
    let two_again = run("t2-again", 2);
    assert!(
        one.contains_key("model.safetensors") && one.contains_key("merge_report.json"),
        "{:?}",
        one.keys()
    );
    assert_eq!(
        one.keys().collect::<Vec<_>>(),
        two.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &one {
        assert!(
            two[name] == *bytes,
            "{name} differs between 1 and 2 threads"
        );
        assert!(two_again[name] == *bytes, "{name} differs between two runs");
    }

    // A fresh plan from the same config, sharded output: the same tensors.
    let fresh = PreparedMerge::new(config(&fam)).unwrap();
    let sharded = tmp.path().join("sharded");
    fresh
        .run(&options(&sharded, Some(2), Some(100_000)))
        .unwrap();
    assert_eq!(read_tensors(&sharded), read_tensors(&tmp.path().join("t1")));
}

#[test]
fn the_same_seed_gives_the_same_merge_anywhere() {
    let tmp = tempdir();
    let merged = |dir: &str| {
        let fam = family(&tmp.path().join(dir), &SMALL, Dtype::F16, 1, 3);
        let out = tmp.path().join(format!("{dir}-out"));
        PreparedMerge::new(config(&fam))
            .unwrap()
            .run(&options(&out, Some(1), None))
            .unwrap();
        read_tensors(&out)
    };
    let a = merged("first");
    let b = merged("second");
    assert_eq!(a.len(), SMALL.tensors().len());
    assert_eq!(a, b);
}

#[test]
fn a_cancelled_merge_leaves_nothing_behind() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let tmp = tempdir();
    let fam = family(&tmp.path().join("family"), &SMALL, Dtype::BF16, 1, 5);
    let parent = tmp.path().join("outputs");
    std::fs::create_dir(&parent).unwrap();
    let out = parent.join("merged");
    let cancel = AtomicBool::new(false);
    let written = std::sync::atomic::AtomicUsize::new(0);
    let on_progress = |p: &flatmerge::engine::Progress<'_>| {
        written.store(p.tensors_done, Ordering::SeqCst);
        if p.tensors_done == 3 {
            cancel.store(true, Ordering::SeqCst);
        }
    };
    let mut opts = options(&out, Some(2), Some(5_000));
    opts.cancel = Some(&cancel);
    opts.progress = Some(&on_progress);
    let err = PreparedMerge::new(config(&fam))
        .unwrap()
        .run(&opts)
        .unwrap_err();
    assert_eq!(err.kind(), flatmerge::ErrorKind::Cancelled, "{err}");
    assert_eq!(written.load(Ordering::SeqCst), 3, "stopped between tensors");
    assert!(
        !out.exists(),
        "a cancelled merge must not create the output"
    );
    let left: Vec<_> = std::fs::read_dir(&parent)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "temporary files left beside the output: {left:?}"
    );
}
