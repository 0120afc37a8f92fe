//! Tokens per second of the native LLaMA probe (`flatmerge::probe::llama`)
//! on random models, BF16 weights, with the recorder keeping per-example
//! rows (what `flatmerge probe` does), and recording every linear layer's
//! Gram instead (`--gram`), for 1 worker thread and for all cores; the
//! forward pass alone (no recorder) for comparison.
//!
//! Run: `cargo bench --bench llama_probe` (a plain `harness = false` main;
//! `cargo bench --no-run` only builds it). `LLAMA_BENCH=small` runs the
//! small model only.

use std::time::{Duration, Instant};

use flatmerge::demo::Rng;
use flatmerge::dtype::Dtype;
use flatmerge::probe::llama::{write_random_model, Llama, LlamaConfig, RandomModel};
use flatmerge::probe::{run_probe, ProbeExample, ProbeInput, ProbeModel};
use flatmerge::recorder::{Recorder, RecorderOptions};

struct Case {
    name: &'static str,
    config: LlamaConfig,
    examples: usize,
    tokens: usize,
}

fn cases() -> Vec<Case> {
    let mut out = vec![Case {
        name: "small",
        // hidden 256, 8 heads over 4 key/value heads, MLP 688, 4 layers.
        config: LlamaConfig::new(4096, 256, 688, 4, 8, 4),
        examples: 16,
        tokens: 128,
    }];
    if std::env::var("LLAMA_BENCH").as_deref() != Ok("small") {
        out.push(Case {
            name: "medium",
            // hidden 1024, 16 heads over 8 key/value heads, MLP 2816, 4 layers.
            config: LlamaConfig::new(8192, 1024, 2816, 4, 16, 8),
            examples: 8,
            tokens: 256,
        });
    }
    out
}

/// Multiply-adds per token in the linear layers (the probe skips `lm_head`).
fn linear_params(c: &LlamaConfig) -> usize {
    let h = c.hidden_size;
    c.num_hidden_layers * (h * c.q_width() * 2 + h * c.kv_width() * 2 + 3 * h * c.intermediate_size)
}

/// Best of `reps` wall times of `f`.
fn best(reps: usize, mut f: impl FnMut()) -> Duration {
    (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("llama_probe: {cores} cores; best of 3 runs; BF16 weights");
    for case in cases() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let model = RandomModel {
            config: case.config.clone(),
            dtype: Dtype::BF16,
            multiway: 0,
            seed: 1,
        };
        write_random_model(dir.path(), &model).expect("write the model");
        let llama = Llama::load(dir.path()).expect("open the model");
        let mut rng = Rng::new(2, "bench tokens");
        let examples: Vec<ProbeExample> = (0..case.examples)
            .map(|_| ProbeExample {
                input: ProbeInput::Tokens(
                    (0..case.tokens)
                        .map(|_| (rng.next_u64() % case.config.vocab_size as u64) as u32)
                        .collect(),
                ),
                modality: 0,
                source: String::new(),
                token_modality: None,
                meta: None,
            })
            .collect();
        let tokens = (case.examples * case.tokens) as f64;
        let flops = 2.0 * linear_params(&case.config) as f64 * tokens;
        println!(
            "{}: {} linear parameters, {} examples × {} tokens",
            case.name,
            linear_params(&case.config),
            case.examples,
            case.tokens
        );
        // Means and rows (what `flatmerge probe` records by default), then
        // means and Grams of every linear layer (`--gram`, no rows), in one run.
        for (what, gram) in [("probe", false), ("probe --gram", true)] {
            for threads in [1, cores] {
                let time = best(3, || {
                    let recorder = Recorder::new(RecorderOptions {
                        max_examples: if gram { 0 } else { case.examples },
                        gram,
                        gram_shared: if gram {
                            llama.gram_shared()
                        } else {
                            Default::default()
                        },
                        ..RecorderOptions::default()
                    });
                    run_probe(&llama, &examples, &recorder, Some(threads)).expect("probe");
                    std::hint::black_box(recorder.stats().expect("stats"));
                });
                let s = time.as_secs_f64();
                println!(
                    "  {what}, {threads} thread(s): {:.3} s, {:.0} tokens/s, {:.1} GFLOP/s in linear layers",
                    s,
                    tokens / s,
                    flops / s / 1e9
                );
            }
        }
        for threads in [1, cores] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let time = best(3, || {
                pool.install(|| {
                    for e in &examples {
                        let ProbeInput::Tokens(t) = &e.input else {
                            unreachable!()
                        };
                        let m = vec![0u8; t.len()];
                        llama
                            .forward_visit(t, &m, false, &mut |_| Ok(()))
                            .expect("forward");
                    }
                })
            });
            let s = time.as_secs_f64();
            println!(
                "  forward only (no recorder; one sequence at a time, {threads} thread(s) inside): \
                 {:.3} s, {:.0} tokens/s",
                s,
                tokens / s
            );
        }
        std::hint::black_box(llama.describe());
    }
}
