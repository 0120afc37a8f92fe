//! The activation recorder: means and rows against a direct computation,
//! the same file for any batching, order and threading, round trips,
//! bf16 pushes, the example/row semantics and one test per bad push.

use std::path::Path;

use flatmerge::demo::Rng;
use flatmerge::dtype::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use flatmerge::recorder::{Activations, Batch, MissingRows, Recorder, RecorderOptions};
use flatmerge::stats::ActivationStats;
use flatmerge::{Error, ErrorKind};

/// `(layer, in, out)` of the test model.
const LAYERS: [(&str, usize, usize); 3] = [
    ("model.layers.0.mlp.up_proj", 6, 10),
    ("model.layers.0.mlp.down_proj", 10, 6),
    ("lm_head", 6, 3),
];

/// One example's tokens through one layer.
#[derive(Clone)]
struct Push {
    layer: &'static str,
    rows: usize,
    x: Vec<f32>,
    y: Vec<f32>,
    example: u64,
    modality: u8,
}

/// `examples` examples of 1–5 tokens each through every layer. `dyadic`:
/// multiples of 1/64 in [-4, 4], whose f64 sums are exact (so a direct
/// computation matches bit for bit); otherwise normals scaled by 2^-20 to
/// 2^20, whose f64 sums depend on the order.
fn pushes(examples: u64, dyadic: bool, seed: u64) -> Vec<Push> {
    let mut out = Vec::new();
    for example in 0..examples {
        let mut rng = Rng::new(seed, &format!("example {example}"));
        let rows = 1 + (rng.next_u64() % 5) as usize;
        let modality = (example % 3) as u8;
        for (layer, i, o) in LAYERS {
            let mut values = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|_| {
                        if dyadic {
                            ((rng.next_u64() % 513) as f32 - 256.0) / 64.0
                        } else {
                            let scale = 2f32.powi((rng.next_u64() % 41) as i32 - 20);
                            rng.normal() * scale
                        }
                    })
                    .collect()
            };
            let x = values(rows * i);
            let y = values(rows * o);
            out.push(Push {
                layer,
                rows,
                x,
                y,
                example,
                modality,
            });
        }
    }
    out
}

fn recorder(max_examples: usize) -> Recorder {
    Recorder::new(RecorderOptions {
        max_examples,
        model: "test model".into(),
        probe: "test probe".into(),
        missing_rows: MissingRows::Zero,
        ..RecorderOptions::default()
    })
}

fn push(r: &Recorder, p: &Push) -> Result<(), Error> {
    r.push_f32(p.layer, p.rows, &p.x, &p.y, p.example, p.modality)
}

/// Splits every push into single-token pushes.
fn single_rows(pushes: &[Push]) -> Vec<Push> {
    let mut out = Vec::new();
    for p in pushes {
        let (i, o) = (p.x.len() / p.rows, p.y.len() / p.rows);
        for r in 0..p.rows {
            out.push(Push {
                rows: 1,
                x: p.x[r * i..(r + 1) * i].to_vec(),
                y: p.y[r * o..(r + 1) * o].to_vec(),
                ..p.clone()
            });
        }
    }
    out
}

fn file_bytes(r: &Recorder, dir: &Path, name: &str) -> Vec<u8> {
    let path = dir.join(name);
    r.save(&path).unwrap();
    std::fs::read(path).unwrap()
}

/// Column means in f64 of the `[rows, width]` blocks, in push order.
fn direct_means(blocks: &[(&[f32], usize)], width: usize) -> Vec<f32> {
    let mut sums = vec![0f64; width];
    let mut count = 0usize;
    for (data, rows) in blocks {
        for row in data.chunks_exact(width) {
            for (s, v) in sums.iter_mut().zip(row) {
                *s += *v as f64;
            }
        }
        count += rows;
    }
    sums.iter().map(|s| (s / count as f64) as f32).collect()
}

#[test]
fn recorder_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Recorder>();
}

#[test]
fn means_and_rows_equal_a_direct_computation() {
    let data = pushes(7, true, 1);
    let r = recorder(100);
    for p in &data {
        push(&r, p).unwrap();
    }
    let stats = r.stats().unwrap();
    assert_eq!(stats.examples, 7);
    assert_eq!(stats.model, "test model");
    assert_eq!(stats.probe, "test probe");
    assert_eq!(
        stats.modality.as_deref(),
        Some(&[0u8, 1, 2, 0, 1, 2, 0][..])
    );
    for (layer, i, o) in LAYERS {
        let mine: Vec<&Push> = data.iter().filter(|p| p.layer == layer).collect();
        let s = stats.layer(layer).unwrap();
        let xs: Vec<(&[f32], usize)> = mine.iter().map(|p| (&p.x[..], p.rows)).collect();
        let ys: Vec<(&[f32], usize)> = mine.iter().map(|p| (&p.y[..], p.rows)).collect();
        assert_eq!(s.x_mean.as_deref().unwrap(), &direct_means(&xs, i)[..]);
        assert_eq!(s.y_mean.as_deref().unwrap(), &direct_means(&ys, o)[..]);
        assert_eq!(
            s.count,
            Some(mine.iter().map(|p| p.rows as u64).sum::<u64>())
        );
        let (x_rows, y_rows) = (s.x_rows.as_ref().unwrap(), s.y_rows.as_ref().unwrap());
        assert_eq!((x_rows.rows, x_rows.width), (7, i));
        assert_eq!((y_rows.rows, y_rows.width), (7, o));
        for p in mine {
            let n = p.example as usize;
            assert_eq!(x_rows.row(n), &direct_means(&[(&p.x, p.rows)], i)[..]);
            assert_eq!(y_rows.row(n), &direct_means(&[(&p.y, p.rows)], o)[..]);
        }
    }
}

#[test]
fn means_of_arbitrary_values_are_within_rounding_of_f64() {
    let data = pushes(9, false, 2);
    let r = recorder(0);
    for p in &data {
        push(&r, p).unwrap();
    }
    let stats = r.stats().unwrap();
    for (layer, i, _) in LAYERS {
        let xs: Vec<(&[f32], usize)> = data
            .iter()
            .filter(|p| p.layer == layer)
            .map(|p| (&p.x[..], p.rows))
            .collect();
        let direct = direct_means(&xs, i);
        let got = stats.layer(layer).unwrap().x_mean.clone().unwrap();
        for (a, b) in got.iter().zip(&direct) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}

#[test]
fn any_batching_and_order_give_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = pushes(6, false, 3);
    let whole = recorder(6);
    for p in &data {
        push(&whole, p).unwrap();
    }
    let split = recorder(6);
    let mut singles = single_rows(&data);
    singles.reverse();
    for p in &singles {
        push(&split, p).unwrap();
    }
    // Pairs of tokens where possible, examples interleaved.
    let mixed = recorder(6);
    let mut rng = Rng::new(9, "shuffle");
    let mut shuffled = singles.clone();
    for i in (1..shuffled.len()).rev() {
        shuffled.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    for p in &shuffled {
        push(&mixed, p).unwrap();
    }
    let a = file_bytes(&whole, dir.path(), "whole.stats.safetensors");
    assert_eq!(a, file_bytes(&split, dir.path(), "split.stats.safetensors"));
    assert_eq!(a, file_bytes(&mixed, dir.path(), "mixed.stats.safetensors"));

    // A naive f64 accumulation does depend on the order for these values:
    // the test would catch an order-dependent recorder.
    let layer = LAYERS[0].0;
    let sum = |ps: &[Push]| -> f64 {
        ps.iter()
            .filter(|p| p.layer == layer)
            .flat_map(|p| p.x.iter())
            .map(|&v| v as f64)
            .sum()
    };
    let forward = single_rows(&data);
    let mut f64_sums = vec![sum(&forward), sum(&singles), sum(&shuffled)];
    f64_sums.dedup();
    assert!(
        f64_sums.len() > 1,
        "the data does not exercise order dependence"
    );
}

#[test]
fn concurrent_pushes_equal_serial_pushes() {
    let dir = tempfile::tempdir().unwrap();
    let data = single_rows(&pushes(24, false, 4));
    let serial = recorder(16);
    for p in &data {
        push(&serial, p).unwrap();
    }
    let expected = file_bytes(&serial, dir.path(), "serial.stats.safetensors");
    for round in 0..3 {
        let concurrent = recorder(16);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (concurrent, data) = (&concurrent, &data);
                s.spawn(move || {
                    // Each thread walks its share backwards or forwards.
                    let mine: Vec<&Push> = data.iter().skip(t).step_by(4).collect();
                    let iter: Box<dyn Iterator<Item = &&Push>> = if (t + round) % 2 == 0 {
                        Box::new(mine.iter())
                    } else {
                        Box::new(mine.iter().rev())
                    };
                    for p in iter {
                        push(concurrent, p).unwrap();
                    }
                });
            }
        });
        assert_eq!(
            file_bytes(&concurrent, dir.path(), "concurrent.stats.safetensors"),
            expected,
            "round {round}"
        );
    }
}

#[test]
fn the_file_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let r = recorder(5);
    for p in &pushes(8, false, 5) {
        push(&r, p).unwrap();
    }
    let path = dir.path().join("r.stats.safetensors");
    r.save(&path).unwrap();
    let loaded = ActivationStats::load(&path).unwrap();
    assert_eq!(loaded, r.stats().unwrap());
    assert_eq!(loaded.examples, 5);
    assert_eq!(loaded.modality.as_ref().unwrap().len(), 5);
    assert_eq!(loaded.layers.len(), LAYERS.len());
}

#[test]
fn bf16_pushes_equal_f32_pushes_of_the_same_values() {
    let dir = tempfile::tempdir().unwrap();
    let data = pushes(5, false, 6);
    let as_f32 = recorder(5);
    let as_bf16 = recorder(5);
    for p in &data {
        let xb: Vec<u16> = p.x.iter().map(|&v| f32_to_bf16(v)).collect();
        let yb: Vec<u16> = p.y.iter().map(|&v| f32_to_bf16(v)).collect();
        let xf: Vec<f32> = xb.iter().map(|&b| bf16_to_f32(b)).collect();
        let yf: Vec<f32> = yb.iter().map(|&b| bf16_to_f32(b)).collect();
        as_bf16
            .push_bf16(p.layer, p.rows, &xb, &yb, p.example, p.modality)
            .unwrap();
        as_f32
            .push_f32(p.layer, p.rows, &xf, &yf, p.example, p.modality)
            .unwrap();
    }
    assert_eq!(
        file_bytes(&as_f32, dir.path(), "f32.stats.safetensors"),
        file_bytes(&as_bf16, dir.path(), "bf16.stats.safetensors")
    );
    // Mixed: x in bf16, y in f32, through the general entry point.
    let p = &data[0];
    let xb: Vec<u16> = p.x.iter().map(|&v| f32_to_bf16(v)).collect();
    let mixed = recorder(5);
    mixed
        .push(&Batch {
            layer: p.layer,
            rows: p.rows,
            x: Activations::Bf16(&xb),
            y: Activations::F32(&p.y),
            example: 0,
            modality: p.modality,
        })
        .unwrap();
    let s = mixed.stats().unwrap();
    let want: Vec<f32> = direct_means(
        &[(
            &xb.iter().map(|&b| bf16_to_f32(b)).collect::<Vec<_>>(),
            p.rows,
        )],
        p.x.len() / p.rows,
    );
    let got = s.layer(p.layer).unwrap().x_mean.as_ref().unwrap();
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0));
    }
}

#[test]
fn f16_pushes_equal_f32_pushes_of_the_same_values_grams_included() {
    let dir = tempfile::tempdir().unwrap();
    // Dyadic values in [-4, 4]: within f16's range, so none overflows.
    let data = pushes(5, true, 7);
    let with_gram = || {
        Recorder::new(RecorderOptions {
            gram: true,
            ..recorder(5).options().clone()
        })
    };
    let (as_f32, as_f16) = (with_gram(), with_gram());
    for p in &data {
        let xh: Vec<u16> = p.x.iter().map(|&v| f32_to_f16(v)).collect();
        let yh: Vec<u16> = p.y.iter().map(|&v| f32_to_f16(v)).collect();
        let xf: Vec<f32> = xh.iter().map(|&b| f16_to_f32(b)).collect();
        let yf: Vec<f32> = yh.iter().map(|&b| f16_to_f32(b)).collect();
        as_f16
            .push_f16(p.layer, p.rows, &xh, &yh, p.example, p.modality)
            .unwrap();
        as_f32
            .push_f32(p.layer, p.rows, &xf, &yf, p.example, p.modality)
            .unwrap();
    }
    assert_eq!(
        file_bytes(&as_f32, dir.path(), "f32.stats.safetensors"),
        file_bytes(&as_f16, dir.path(), "f16.stats.safetensors")
    );
    // An f16 infinity is refused like an f32 one, naming row and column.
    let inf = [0x7c00u16, 0, 0, 0, 0, 0];
    let err = as_f16
        .push_f16("lm_head", 1, &inf, &[0; 3], 0, data[0].modality)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(
        err.to_string().contains("row 0, column 0 is infinite"),
        "{err}"
    );
}

#[test]
fn ids_beyond_max_examples_count_in_means_but_have_no_rows() {
    let data = pushes(6, true, 7);
    let capped = recorder(4);
    let full = recorder(100);
    for p in &data {
        push(&capped, p).unwrap();
        push(&full, p).unwrap();
    }
    let (c, f) = (capped.stats().unwrap(), full.stats().unwrap());
    assert_eq!((c.examples, f.examples), (4, 6));
    assert_eq!(c.modality.as_deref(), Some(&[0u8, 1, 2, 0][..]));
    for (layer, i, _) in LAYERS {
        let (cl, fl) = (c.layer(layer).unwrap(), f.layer(layer).unwrap());
        assert_eq!(cl.x_mean, fl.x_mean, "means use every example");
        assert_eq!(cl.count, fl.count);
        let (cr, fr) = (cl.x_rows.as_ref().unwrap(), fl.x_rows.as_ref().unwrap());
        assert_eq!(cr.rows, 4);
        assert_eq!(cr.data[..], fr.data[..4 * i]);
    }
}

#[test]
fn without_rows_examples_counts_distinct_ids() {
    let r = recorder(0);
    for p in pushes(5, true, 8).iter().filter(|p| p.example != 2) {
        push(&r, p).unwrap();
    }
    let s = r.stats().unwrap();
    assert_eq!(s.examples, 4);
    assert_eq!(s.modality, None);
    assert!(s
        .layers
        .values()
        .all(|l| l.x_rows.is_none() && l.y_rows.is_none()));
}

#[test]
fn an_example_id_never_pushed_is_an_error_when_rows_are_kept() {
    let r = recorder(10);
    for p in pushes(5, true, 9).iter().filter(|p| p.example != 2) {
        push(&r, p).unwrap();
    }
    let e = r.stats().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.message().contains("example id 2 was never pushed"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gap.stats.safetensors");
    let e = r.save(&path).unwrap_err();
    assert_eq!(e.file(), Some(path.as_path()), "{e}");
    assert!(!path.exists());
}

#[test]
fn an_example_that_misses_a_layer_gets_zero_rows_or_an_error() {
    // Example 1 never reaches `lm_head` (say, a vision tower's layer).
    let data: Vec<Push> = pushes(3, true, 10)
        .into_iter()
        .filter(|p| !(p.example == 1 && p.layer == "lm_head"))
        .collect();
    let zero = recorder(3);
    let strict = Recorder::new(RecorderOptions {
        max_examples: 3,
        missing_rows: MissingRows::Error,
        ..RecorderOptions::default()
    });
    for p in &data {
        push(&zero, p).unwrap();
        push(&strict, p).unwrap();
    }
    let s = zero.stats().unwrap();
    let rows = s.layer("lm_head").unwrap().y_rows.as_ref().unwrap();
    assert_eq!(rows.row(1), &[0.0; 3]);
    assert_ne!(rows.row(0), &[0.0; 3]);
    let e = strict.stats().unwrap_err();
    assert_eq!(e.tensor(), Some("lm_head"));
    assert!(e.message().contains("example 1 never reached"), "{e}");
}

/// Asserts an InvalidInput error naming `layer` and containing `needles`.
fn assert_bad(result: Result<(), Error>, layer: &str, needles: &[&str]) {
    let e = result.expect_err("the push should be refused");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert_eq!(e.tensor(), Some(layer), "{e}");
    let text = e.to_string();
    for n in needles {
        assert!(text.contains(n), "`{n}` not in: {text}");
    }
}

#[test]
fn bad_pushes_get_clear_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = recorder(4);
    let l = "blocks.0.fc";
    r.push_f32(l, 2, &[1.0; 8], &[2.0; 6], 0, 0).unwrap();
    let before = file_bytes(&r, dir.path(), "before.stats.safetensors");

    // Wrong widths for a known layer (4 → 3).
    assert_bad(
        r.push_f32(l, 2, &[1.0; 10], &[2.0; 6], 1, 0),
        l,
        &[
            "x has 10 values for 2 rows",
            "input width is 4",
            "expected 8",
        ],
    );
    assert_bad(
        r.push_f32(l, 1, &[1.0; 4], &[2.0; 4], 1, 0),
        l,
        &["y has 4 values for 1 rows", "output width is 3"],
    );
    // A new layer whose slices are not a multiple of the rows.
    assert_bad(
        r.push_f32("other", 3, &[1.0; 7], &[1.0; 3], 1, 0),
        "other",
        &["x has 7 values, not a positive multiple of 3 rows"],
    );
    assert_bad(
        r.push_f32("other", 1, &[1.0; 2], &[], 1, 0),
        "other",
        &["y has 0 values"],
    );
    assert_bad(r.push_f32(l, 0, &[], &[], 1, 0), l, &["at least one row"]);
    // Values: NaN, infinity, beyond ±2^60 — with row and column.
    let mut x = [1.0f32; 8];
    x[5] = f32::NAN;
    assert_bad(
        r.push_f32(l, 2, &x, &[2.0; 6], 1, 0),
        l,
        &["x row 1, column 1 is NaN"],
    );
    let mut y = [1.0f32; 6];
    y[2] = f32::NEG_INFINITY;
    assert_bad(
        r.push_f32(l, 2, &[1.0; 8], &y, 1, 0),
        l,
        &["y row 0, column 2 is infinite"],
    );
    y[2] = 3e18;
    assert_bad(
        r.push_f32(l, 2, &[1.0; 8], &y, 1, 0),
        l,
        &["y row 0, column 2", "range ±2^60"],
    );
    let nan_bf16 = [f32_to_bf16(f32::NAN); 4];
    assert_bad(
        r.push_bf16(l, 1, &nan_bf16, &[0; 3], 1, 0),
        l,
        &["x row 0, column 0 is NaN"],
    );
    // A second modality for example 0.
    assert_bad(
        r.push_f32(l, 1, &[1.0; 4], &[2.0; 3], 0, 2),
        l,
        &["example 0 pushed with modality 2", "modality 0 before"],
    );
    assert_bad(
        r.push_f32("fresh", 1, &[1.0; 2], &[2.0; 2], 0, 1),
        "fresh",
        &["example 0 pushed with modality 1"],
    );
    assert_bad(r.push_f32("", 1, &[1.0], &[1.0], 1, 0), "", &["empty"]);

    assert_eq!(
        file_bytes(&r, dir.path(), "after.stats.safetensors"),
        before,
        "a refused push changed the statistics"
    );
    // The refused first batch of `fresh` did not set its widths.
    r.push_f32("fresh", 1, &[1.0; 5], &[2.0; 1], 0, 0).unwrap();
}

#[test]
fn sums_too_large_for_exact_accumulation_are_refused() {
    let r = recorder(0);
    let big = [2f32.powi(60); 64];
    // 2^60 × 2^60 per value: 2^7 values reach 2^127.
    r.push_f32("huge", 1, &big, &[0.0], 0, 0).unwrap();
    let e = r.push_f32("huge", 2, &[2f32.powi(60); 128], &[0.0; 2], 0, 0);
    assert_bad(e, "huge", &["too large to sum exactly"]);
    let e = r.stats().unwrap_err();
    assert_eq!(e.tensor(), Some("huge"));
}

// ---- Second moments (Grams) and combining partial states ----

use flatmerge::dtype::Dtype;
use flatmerge::io::{OutputTensor, SafetensorsWriter};
use flatmerge::recorder::{combine_parts, combine_recorders};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn gram_recorder(max_examples: usize) -> Recorder {
    Recorder::new(RecorderOptions {
        max_examples,
        model: "test model".into(),
        probe: "test probe".into(),
        gram: true,
        ..RecorderOptions::default()
    })
}

/// `Σ x xᵀ / count` in f64 over the pushes of `layer`, full `[in, in]`.
fn direct_gram(data: &[Push], layer: &str, width: usize) -> Vec<f64> {
    let mut g = vec![0f64; width * width];
    let mut count = 0usize;
    for p in data.iter().filter(|p| p.layer == layer) {
        for row in p.x.chunks_exact(width) {
            for i in 0..width {
                for j in 0..width {
                    g[i * width + j] += row[i] as f64 * row[j] as f64;
                }
            }
        }
        count += p.rows;
    }
    g.iter().map(|v| v / count as f64).collect()
}

#[test]
fn gram_of_dyadic_values_equals_the_exact_mean_second_moment() {
    // Multiples of 1/64: every product and sum is exact in f64 and in the
    // recorder's fixed point, so the f32 Gram is the exact value rounded.
    let data = pushes(9, true, 21);
    let r = gram_recorder(0);
    for p in &data {
        push(&r, p).unwrap();
    }
    let stats = r.stats().unwrap();
    for (layer, width, _) in LAYERS {
        let want: Vec<f32> = direct_gram(&data, layer, width)
            .iter()
            .map(|&v| v as f32)
            .collect();
        assert_eq!(stats.gram(layer).unwrap().values(), &want[..], "{layer}");
    }
}

#[test]
fn gram_of_arbitrary_values_is_within_rounding_of_f64() {
    // Tolerance: f32 rounding of the result (2^-24 relative) plus the f64
    // partial sums' order (≤ rows · 2^-53 of √(G_ii G_jj)), so
    // |got − want| ≤ 2^-22 · √(G_ii · G_jj).
    let data = pushes(12, false, 22);
    let r = gram_recorder(0);
    for p in &data {
        push(&r, p).unwrap();
    }
    let stats = r.stats().unwrap();
    for (layer, width, _) in LAYERS {
        let want = direct_gram(&data, layer, width);
        let got = stats.gram(layer).unwrap().values();
        assert_eq!(got.len(), width * width);
        for i in 0..width {
            for j in 0..width {
                let scale = (want[i * width + i] * want[j * width + j]).sqrt();
                let diff = (got[i * width + j] as f64 - want[i * width + j]).abs();
                assert!(
                    diff <= scale * 2f64.powi(-22),
                    "{layer} [{i}, {j}]: {diff} vs {scale}"
                );
                assert_eq!(got[i * width + j], got[j * width + i]);
            }
        }
    }
}

#[test]
fn gram_files_are_byte_identical_for_any_push_order_and_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let data = pushes(20, false, 23);
    let serial = gram_recorder(8);
    for p in &data {
        push(&serial, p).unwrap();
    }
    let expected = file_bytes(&serial, dir.path(), "serial.stats.safetensors");
    let reversed = gram_recorder(8);
    for p in data.iter().rev() {
        push(&reversed, p).unwrap();
    }
    assert_eq!(
        file_bytes(&reversed, dir.path(), "rev.stats.safetensors"),
        expected
    );
    for threads in [2, 3, 5] {
        let concurrent = gram_recorder(8);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (concurrent, data) = (&concurrent, &data);
                s.spawn(move || {
                    for p in data.iter().skip(t).step_by(threads).rev() {
                        push(concurrent, p).unwrap();
                    }
                });
            }
        });
        assert_eq!(
            file_bytes(&concurrent, dir.path(), "threads.stats.safetensors"),
            expected,
            "{threads} threads"
        );
    }
    let header = header_json(&expected);
    assert_eq!(header["__metadata__"]["version"], "2");
}

/// The JSON header of a safetensors file's bytes.
fn header_json(bytes: &[u8]) -> serde_json::Value {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + n]).unwrap()
}

#[test]
fn a_means_only_recording_still_writes_version_1() {
    let dir = tempfile::tempdir().unwrap();
    let r = recorder(4);
    for p in &pushes(6, false, 24) {
        push(&r, p).unwrap();
    }
    let bytes = file_bytes(&r, dir.path(), "v1.stats.safetensors");
    let header = header_json(&bytes);
    let keys: Vec<&String> = header["__metadata__"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["examples", "format", "model", "probe", "version"]);
    assert_eq!(header["__metadata__"]["version"], "1");
    assert!(header
        .as_object()
        .unwrap()
        .keys()
        .all(|k| !k.ends_with(".x_gram")));
    // Loading and saving again reproduces it byte for byte.
    let path = dir.path().join("again.stats.safetensors");
    ActivationStats::load(&dir.path().join("v1.stats.safetensors"))
        .unwrap()
        .save(&path)
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), bytes);
}

#[test]
fn shared_grams_are_stored_once_and_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let options = RecorderOptions {
        gram: true,
        gram_shared: [("k".to_string(), "q".to_string())].into(),
        ..RecorderOptions::default()
    };
    let r = Recorder::new(options.clone());
    let x: Vec<f32> = (0..12).map(|v| v as f32 * 0.25 - 1.0).collect();
    r.push_f32("q", 3, &x, &[1.0; 6], 0, 0).unwrap();
    r.push_f32("k", 3, &x, &[2.0; 3], 0, 0).unwrap();
    let path = dir.path().join("shared.stats.safetensors");
    r.save(&path).unwrap();
    let stats = ActivationStats::load(&path).unwrap();
    assert!(stats.layers["k"].x_gram.is_none());
    // Loaded Grams stay in the mapped file until a merge decodes one.
    assert!(stats.gram("q").unwrap().is_mapped());
    assert_eq!(stats.gram("k"), stats.gram("q"));
    assert_eq!(stats.gram_owner("k"), "q");
    // Hand-computed: x rows (-1, -0.75, -0.5, -0.25), (0, .25, .5, .75), (1, 1.25, 1.5, 1.75).
    let g = stats.gram("k").unwrap().values();
    assert_eq!(g[0], (1.0 + 0.0 + 1.0) / 3.0);
    assert_eq!(g[1], (0.75 + 0.0 + 1.25) / 3.0);
    assert_eq!(g[15], (0.0625 + 0.5625 + 3.0625) / 3.0);
    let header = header_json(&std::fs::read(&path).unwrap());
    assert_eq!(header["__metadata__"]["gram_shared"], r#"{"k":"q"}"#);

    // An alias that did not read its owner's input is refused.
    let wrong = Recorder::new(options);
    wrong.push_f32("q", 3, &x, &[1.0; 6], 0, 0).unwrap();
    let mut other = x.clone();
    other[5] = 9.0;
    wrong.push_f32("k", 3, &other, &[2.0; 3], 0, 0).unwrap();
    let e = wrong.stats().unwrap_err();
    assert_eq!(e.tensor(), Some("k"));
    assert!(e.message().contains("inputs differ"), "{e}");
}

#[test]
fn gram_memory_is_bounded_by_the_recorded_layers_not_the_pushed_ones() {
    // A range of two layers: the accumulators do not grow with the number
    // of layers pushed.
    let width = 16;
    let x = vec![0.5f32; 2 * width];
    let mut bytes = Vec::new();
    for layers in [4usize, 16, 64] {
        let r = Recorder::new(RecorderOptions {
            gram: true,
            gram_layers: Some(["l1".to_string(), "l2".to_string()].into()),
            ..RecorderOptions::default()
        });
        for l in 0..layers {
            r.push_f32(&format!("l{l}"), 2, &x, &x, 0, 0).unwrap();
        }
        bytes.push(r.gram_bytes());
        let stats = r.stats().unwrap();
        assert_eq!(
            stats.layers.values().filter(|s| s.x_gram.is_some()).count(),
            2
        );
    }
    assert_eq!(bytes, [2 * 16 * width * (width + 1) / 2; 3]);
}

fn save_part(r: &Recorder, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    r.save_part(&path).unwrap();
    path
}

#[test]
fn combining_parts_of_disjoint_examples_gives_the_union_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    for (max_examples, gram) in [(0, true), (10, true), (10, false)] {
        let make = || {
            Recorder::new(RecorderOptions {
                max_examples,
                model: "m".into(),
                probe: "p".into(),
                gram,
                gram_shared: [(LAYERS[2].0.to_string(), LAYERS[0].0.to_string())].into(),
                ..RecorderOptions::default()
            })
        };
        // lm_head reads up_proj's input in this test so that it may share.
        let mut data = pushes(10, false, 25);
        for e in 0..10 {
            let up = data
                .iter()
                .find(|p| p.example == e && p.layer == LAYERS[0].0)
                .unwrap()
                .x
                .clone();
            let head = data
                .iter_mut()
                .find(|p| p.example == e && p.layer == LAYERS[2].0)
                .unwrap();
            head.x = up;
        }
        let (union, a, b, c) = (make(), make(), make(), make());
        for p in &data {
            push(&union, p).unwrap();
            let part = match p.example {
                0..=3 => &a,
                4..=6 => &b,
                _ => &c,
            };
            push(part, p).unwrap();
        }
        let expected = file_bytes(&union, dir.path(), "union.stats.safetensors");
        let parts = vec![
            save_part(&c, dir.path(), "c.part"),
            save_part(&a, dir.path(), "a.part"),
            save_part(&b, dir.path(), "b.part"),
        ];
        let out = dir.path().join("combined.stats.safetensors");
        combine_parts(&parts, &out).unwrap();
        assert_eq!(
            std::fs::read(&out).unwrap(),
            expected,
            "M={max_examples} gram={gram}"
        );
        // Parts combine hierarchically too.
        let ab = dir.path().join("ab.part");
        combine_parts(&parts[1..], &ab).unwrap();
        combine_parts(&[ab, parts[0].clone()], &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), expected);
    }
}

#[test]
fn combining_refuses_other_models_probe_sets_overlaps_and_statistics_files() {
    let dir = tempfile::tempdir().unwrap();
    let make = |model: &str, probe: &str, examples: std::ops::Range<u64>, name: &str| {
        let r = Recorder::new(RecorderOptions {
            model: model.into(),
            probe: probe.into(),
            gram: true,
            ..RecorderOptions::default()
        });
        for p in pushes(6, false, 26)
            .iter()
            .filter(|p| examples.contains(&p.example))
        {
            push(&r, p).unwrap();
        }
        save_part(&r, dir.path(), name)
    };
    let a = make("m", "p", 0..3, "a.part");
    let cases = [
        (make("other", "p", 3..6, "m.part"), "different model"),
        (make("m", "other", 3..6, "p.part"), "different probe set"),
        (
            make("m", "p", 2..6, "o.part"),
            "example 2 was also recorded in",
        ),
    ];
    for (b, needle) in cases {
        let e = combine_recorders(&[a.clone(), b.clone()]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Stats, "{e}");
        assert_eq!(e.file(), Some(b.as_path()), "{e}");
        assert!(e.message().contains(needle), "{needle}: {e}");
        assert!(!e.to_string().contains('\n'), "{e}");
    }
    let r = gram_recorder(0);
    push(&r, &pushes(1, false, 1)[0]).unwrap();
    let stats_file = dir.path().join("s.stats.safetensors");
    r.save(&stats_file).unwrap();
    let e = combine_recorders(&[a.clone(), stats_file]).unwrap_err();
    assert!(e.message().contains("cannot be combined exactly"), "{e}");
    // Restricted to sources beside unrestricted.
    let s = Recorder::new(RecorderOptions {
        model: "m".into(),
        probe: "p".into(),
        gram: true,
        sources: Some(vec!["x".into()]),
        ..RecorderOptions::default()
    });
    push(&s, &pushes(6, false, 26)[15]).unwrap();
    let sp = save_part(&s, dir.path(), "s.part");
    let e = combine_recorders(&[a, sp]).unwrap_err();
    assert!(e.message().contains("restricted to probe sources"), "{e}");
}

#[test]
fn sources_are_written_sorted_and_their_union_when_combined() {
    let dir = tempfile::tempdir().unwrap();
    let data = pushes(4, false, 27);
    let make = |sources: &[&str], examples: std::ops::Range<u64>| {
        let r = Recorder::new(RecorderOptions {
            gram: true,
            sources: Some(sources.iter().map(|s| s.to_string()).collect()),
            ..RecorderOptions::default()
        });
        for p in data.iter().filter(|p| examples.contains(&p.example)) {
            push(&r, p).unwrap();
        }
        r
    };
    let a = save_part(
        &make(&["zeta", "alpha", "zeta"], 0..2),
        dir.path(),
        "a.part",
    );
    let b = save_part(&make(&["beta"], 2..4), dir.path(), "b.part");
    let out = dir.path().join("c.stats.safetensors");
    combine_parts(&[a, b], &out).unwrap();
    let stats = ActivationStats::load(&out).unwrap();
    assert_eq!(stats.sources.unwrap(), ["alpha", "beta", "zeta"]);
    let union = make(&["beta", "zeta", "alpha"], 0..4);
    assert_eq!(
        file_bytes(&union, dir.path(), "u.stats.safetensors"),
        std::fs::read(&out).unwrap()
    );
}

/// Writes a statistics file of F32 tensors `(name, shape, values)`.
fn write_stats(
    path: &Path,
    version: &str,
    extra: &[(&str, &str)],
    tensors: &[(&str, Vec<usize>, Vec<f32>)],
) {
    let mut meta: BTreeMap<String, String> = [
        ("format", "flatmerge.activations"),
        ("version", version),
        ("examples", "0"),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    meta.retain(|_, v| !v.is_empty());
    let out: Vec<OutputTensor> = tensors
        .iter()
        .map(|(n, s, _)| OutputTensor::new(*n, Dtype::F32, s.clone()))
        .collect();
    let mut w = SafetensorsWriter::create(path, &out, &meta).unwrap();
    for (n, _, v) in tensors {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write_tensor(n, &bytes).unwrap();
    }
    w.finish().unwrap();
}

/// A bad-file case: version, metadata, tensors, the tensor the error
/// names, and a phrase it contains.
type BadCase<'a> = (
    &'a str,
    Vec<(&'a str, &'a str)>,
    Vec<(&'a str, Vec<usize>, Vec<f32>)>,
    &'a str,
    &'a str,
);

#[test]
fn bad_grams_get_one_clear_error_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.stats.safetensors");
    let mean = ("l.x_mean", vec![2], vec![0.5, 0.5]);
    let cases: Vec<BadCase> = vec![
        (
            "2",
            vec![],
            vec![mean.clone(), ("l.x_gram", vec![3, 3], vec![1.0; 9])],
            "l.x_gram",
            "length 2",
        ),
        (
            "2",
            vec![],
            vec![("l.x_gram", vec![2, 3], vec![1.0; 6])],
            "l.x_gram",
            "[in, in]",
        ),
        (
            "2",
            vec![],
            vec![("l.x_gram", vec![2, 2], vec![1.0, 0.5, 0.25, 1.0])],
            "l.x_gram",
            "not symmetric",
        ),
        (
            "2",
            vec![],
            vec![("l.x_gram", vec![2, 2], vec![1.0, f32::NAN, f32::NAN, 1.0])],
            "l.x_gram",
            "NaN",
        ),
        (
            "2",
            vec![],
            vec![("l.x_gram", vec![2, 2], vec![-1.0, 0.0, 0.0, 1.0])],
            "l.x_gram",
            "never negative",
        ),
        (
            "1",
            vec![],
            vec![("l.x_gram", vec![2, 2], vec![1.0; 4])],
            "l.x_gram",
            "version 2",
        ),
        (
            "2",
            vec![("gram_shared", r#"{"k":"missing"}"#)],
            vec![("l.x_gram", vec![2, 2], vec![1.0; 4])],
            "__metadata__.gram_shared",
            "not a layer",
        ),
        (
            "2",
            vec![("gram_shared", "[1]")],
            vec![("l.x_gram", vec![2, 2], vec![1.0; 4])],
            "__metadata__.gram_shared",
            "not a JSON object",
        ),
        (
            "2",
            vec![("sources", "{}")],
            vec![("l.x_gram", vec![2, 2], vec![1.0; 4])],
            "__metadata__.sources",
            "JSON array",
        ),
    ];
    for (version, extra, tensors, tensor, needle) in cases {
        write_stats(&path, version, &extra, &tensors);
        let e = ActivationStats::load(&path).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Stats, "{e}");
        assert_eq!(e.file(), Some(path.as_path()), "{e}");
        assert_eq!(e.tensor(), Some(tensor), "{e}");
        assert!(e.message().contains(needle), "{needle}: {e}");
    }
    // A foreign writer's rounding asymmetry is accepted and mirrored.
    let tiny = 1.0 + 2f32.powi(-20);
    write_stats(
        &path,
        "2",
        &[],
        &[
            mean,
            ("l.x_gram", vec![2, 2], vec![1.0, 0.5, 0.5 * tiny, 1.0]),
        ],
    );
    let stats = ActivationStats::load(&path).unwrap();
    assert_eq!(*stats.gram("l").unwrap().values(), [1.0, 0.5, 0.5, 1.0]);
}

#[test]
fn pushes_beyond_the_gram_range_are_refused_and_add_nothing() {
    let r = gram_recorder(0);
    let big = vec![2f32.powi(39); 2];
    let e = r.push_f32("l", 1, &big, &[0.0], 0, 0).unwrap_err();
    assert_eq!(e.tensor(), Some("l"));
    assert!(e.message().contains("beyond the Gram's range"), "{e}");
    r.push_f32("l", 1, &[1.0, 2.0], &[0.0], 0, 0).unwrap();
    let stats = r.stats().unwrap();
    assert_eq!(stats.layers["l"].count, Some(1));
    assert_eq!(*stats.gram("l").unwrap().values(), [1.0, 2.0, 2.0, 4.0]);
}

mod gram_properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Any permutation of whole pushes gives the same file; the Gram is
        /// symmetric, with a non-negative diagonal and Cauchy–Schwarz bounded.
        #[test]
        fn order_free_symmetric_and_bounded(seed in 0u64..1000, rotate in 0usize..40) {
            let dir = tempfile::tempdir().unwrap();
            let mut data = pushes(5, false, seed);
            let a = gram_recorder(0);
            for p in &data { push(&a, p).unwrap(); }
            let rot = rotate % data.len();
            data.rotate_left(rot);
            let last = data.len() - 1;
            data.swap(0, last);
            let b = gram_recorder(0);
            for p in &data { push(&b, p).unwrap(); }
            prop_assert_eq!(file_bytes(&a, dir.path(), "a"), file_bytes(&b, dir.path(), "b"));
            let stats = a.stats().unwrap();
            for (layer, w, _) in LAYERS {
                let g = stats.gram(layer).unwrap().values();
                for i in 0..w {
                    prop_assert!(g[i * w + i] >= 0.0);
                    for j in 0..w {
                        prop_assert_eq!(g[i * w + j], g[j * w + i]);
                        let bound = (g[i * w + i] as f64 * g[j * w + j] as f64).sqrt() * (1.0 + 1e-6);
                        prop_assert!((g[i * w + j] as f64).abs() <= bound);
                    }
                }
            }
        }
    }
}

/// `v × 2^scale` truncated toward zero as 32-bit limbs, as a device would
/// split it (the value's integer significand shifted into place).
fn fixed_limbs(v: f64, scale: i32) -> [i64; 4] {
    let q = (v * 2f64.powi(scale)) as i128;
    let u = q.unsigned_abs();
    let sign = if q < 0 { -1 } else { 1 };
    std::array::from_fn(|k| sign * ((u >> (32 * k)) & 0xffff_ffff) as i64)
}

#[test]
fn moments_reduced_elsewhere_give_the_host_file_byte_for_byte() {
    use flatmerge::recorder::{limbs, Moments};
    // Arbitrary magnitudes (2^-20..2^20), so truncation and the Gram's f64
    // rounding both matter; the limbs are summed in i64 as a device would.
    let data = pushes(7, false, 5);
    let dir = tempfile::tempdir().unwrap();
    let host = gram_recorder(4);
    for p in &data {
        push(&host, p).unwrap();
    }
    let reduced = gram_recorder(4);
    let mut grams: BTreeMap<&str, (Vec<[i64; 4]>, usize)> = BTreeMap::new();
    // Reversed: order does not matter either.
    for p in data.iter().rev() {
        let (i, o) = (p.x.len() / p.rows, p.y.len() / p.rows);
        let column = |values: &[f32], width: usize, c: usize| -> ([i64; 4], [i64; 4]) {
            let (mut signed, mut magnitude) = ([0i64; 4], [0i64; 4]);
            for row in values.chunks_exact(width) {
                let l = fixed_limbs(row[c] as f64, 60);
                for (k, v) in l.into_iter().enumerate() {
                    signed[k] += v;
                    magnitude[k] += v.abs();
                }
            }
            (signed, magnitude)
        };
        let mut total = 0u128;
        let mut sums = |values: &[f32], width: usize| -> Vec<i128> {
            (0..width)
                .map(|c| {
                    let (s, m) = column(values, width, c);
                    total = total.saturating_add(limbs::to_u128_saturating(&m).unwrap());
                    limbs::to_i128(&s)
                })
                .collect()
        };
        let (x_sum, y_sum) = (sums(&p.x, i), sums(&p.y, o));
        reduced
            .push_moments(&Moments {
                layer: p.layer,
                count: p.rows as u64,
                x_sum: &x_sum,
                y_sum: &y_sum,
                magnitude: total,
                example: p.example,
                modality: p.modality,
            })
            .unwrap();
        // The push's XᵀX in f64, each entry over the rows in order.
        let entry = grams
            .entry(p.layer)
            .or_insert_with(|| (vec![[0i64; 4]; i * (i + 1) / 2], i));
        let mut t = 0;
        for a in 0..i {
            for b in a..i {
                let mut g = 0f64;
                for row in p.x.chunks_exact(i) {
                    g += row[a] as f64 * row[b] as f64;
                }
                let l = fixed_limbs(g, 50);
                for (e, v) in entry.0[t].iter_mut().zip(l) {
                    *e += v;
                }
                t += 1;
            }
        }
    }
    for (layer, (acc, width)) in &grams {
        let sums: Vec<i128> = acc.iter().map(|l| limbs::to_i128(l)).collect();
        let trace = Recorder::triangle_diagonal(*width)
            .map(|d| limbs::to_u128_saturating(&acc[d]).unwrap())
            .fold(0u128, u128::saturating_add);
        reduced.add_gram_sums(layer, &sums, trace).unwrap();
    }
    let want = file_bytes(&host, dir.path(), "host.st");
    assert!(!want.is_empty());
    assert_eq!(file_bytes(&reduced, dir.path(), "reduced.st"), want);

    // Misuse is refused by name.
    let err = reduced.add_gram_sums("nowhere", &[0], 0).unwrap_err();
    assert!(err.to_string().contains("never pushed"), "{err}");
    let err = reduced.add_gram_sums("lm_head", &[0; 3], 0).unwrap_err();
    assert!(
        err.to_string()
            .contains("upper triangle of a 6 input has 21"),
        "{err}"
    );
    let err = reduced
        .push_moments(&Moments {
            layer: "lm_head",
            count: 1,
            x_sum: &[0; 5],
            y_sum: &[0; 3],
            magnitude: 0,
            example: 0,
            modality: 0,
        })
        .unwrap_err();
    assert!(err.to_string().contains("input width is 6"), "{err}");
    let means_only = recorder(0);
    means_only
        .push_moments(&Moments {
            layer: "l",
            count: 2,
            x_sum: &[1 << 60],
            y_sum: &[0],
            magnitude: 1 << 60,
            example: 0,
            modality: 0,
        })
        .unwrap();
    let err = means_only.add_gram_sums("l", &[0], 0).unwrap_err();
    assert!(err.to_string().contains("stores no Gram"), "{err}");
}
