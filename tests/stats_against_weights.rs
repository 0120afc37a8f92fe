//! Statistics that do not fit the weights are refused before any tensor is
//! read, each problem naming the statistics file, the statistics tensor and
//! the weight it was checked against — and all of them at once. (Widths of
//! the receiver's and a contributor's means: `cli/tests/cli.rs`; problems
//! inside one statistics file: `core/tests/io.rs`.)

use flatmerge::engine::PreparedMerge;
use flatmerge::stats::ActivationStats;
use flatmerge::{dtype::Dtype, ErrorKind};
use flatmerge_suite::{config, family, tempdir, SMALL};
use std::path::Path;

fn edit_stats(path: &Path, edit: impl FnOnce(&mut ActivationStats)) {
    let mut stats = ActivationStats::load(path).unwrap();
    edit(&mut stats);
    stats.save(path).unwrap();
}

const DOWN: &str = "model.layers.1.mlp.down_proj";
const UP: &str = "model.layers.0.mlp.up_proj";

#[test]
fn the_ancestors_mean_output_must_have_the_weights_row_count() {
    let tmp = tempdir();
    let fam = family(tmp.path(), &SMALL, Dtype::F32, 1, 3);
    let c_stats = fam.dir.join("C.stats.safetensors");
    edit_stats(&c_stats, |s| {
        s.layers
            .get_mut(UP)
            .unwrap()
            .y_mean
            .as_mut()
            .unwrap()
            .push(0.0);
    });
    let e = PreparedMerge::new(config(&fam)).err().expect("refused");
    assert_eq!(e.kind(), ErrorKind::Stats, "{e}");
    assert_eq!(e.file(), Some(c_stats.as_path()), "{e}");
    assert_eq!(e.tensor(), Some(format!("{UP}.y_mean").as_str()), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("the ancestor's") && text.contains("width 89") && text.contains("needs 88"),
        "{text}"
    );
}

#[test]
fn a_layer_with_statistics_but_no_mean_is_incomplete_not_a_fallback() {
    let tmp = tempdir();
    let fam = family(tmp.path(), &SMALL, Dtype::F32, 1, 3);
    let a_stats = fam.dir.join("A.stats.safetensors");
    edit_stats(&a_stats, |s| s.layers.get_mut(DOWN).unwrap().x_mean = None);
    let e = PreparedMerge::new(config(&fam)).err().expect("refused");
    assert_eq!(e.kind(), ErrorKind::Stats, "{e}");
    assert_eq!(e.file(), Some(a_stats.as_path()), "{e}");
    assert_eq!(e.tensor(), Some(format!("{DOWN}.x_mean").as_str()), "{e}");
    assert!(e.to_string().contains("incomplete"), "{e}");
}

#[test]
fn every_statistics_problem_is_reported_at_once() {
    let tmp = tempdir();
    let fam = family(tmp.path(), &SMALL, Dtype::F32, 1, 3);
    let a_stats = fam.dir.join("A.stats.safetensors");
    let b_stats = fam.dir.join("B.stats.safetensors");
    edit_stats(&a_stats, |s| s.layers.get_mut(DOWN).unwrap().x_mean = None);
    edit_stats(&b_stats, |s| {
        s.layers
            .get_mut(UP)
            .unwrap()
            .y_mean
            .as_mut()
            .unwrap()
            .truncate(10);
    });
    let e = PreparedMerge::new(config(&fam)).err().expect("refused");
    assert_eq!(e.kind(), ErrorKind::Plan, "{e}");
    let text = e.to_string();
    assert!(text.starts_with("2 problems with the inputs:"), "{text}");
    for needle in [
        format!("{}: `{DOWN}.x_mean`", a_stats.display()),
        format!("{}: `{UP}.y_mean`", b_stats.display()),
        "contributor 0's".to_string(),
        "width 10".to_string(),
    ] {
        assert!(text.contains(&needle), "`{needle}` not in: {text}");
    }
}

#[test]
fn a_broken_statistics_file_and_a_missing_one_are_both_reported() {
    let tmp = tempdir();
    let fam = family(tmp.path(), &SMALL, Dtype::F32, 1, 3);
    let a_stats = fam.dir.join("A.stats.safetensors");
    let c_stats = fam.dir.join("C.stats.safetensors");
    std::fs::write(&a_stats, b"not a statistics file").unwrap();
    std::fs::remove_file(&c_stats).unwrap();
    let e = PreparedMerge::new(config(&fam)).err().expect("refused");
    let text = e.to_string();
    assert!(text.starts_with("2 problems with the inputs:"), "{text}");
    assert!(text.contains(&format!("{}: ", a_stats.display())), "{text}");
    assert!(text.contains(&format!("{}: ", c_stats.display())), "{text}");
}
