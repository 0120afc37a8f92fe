//! The streamed TIES trim (one sample, one gathering pass, task vectors
//! never held whole) keeps exactly the entries of the sequential radix
//! top-k on whole in-memory task vectors, ties at the threshold broken by
//! index: the engine's output equals a reference built from the kernels of
//! `flatmerge::baselines` on whole tensors, bit for bit.

use flatmerge::baselines::{magnitude_key, task_arithmetic_combine, trim_count, TopK};
use flatmerge::config::MergeConfig;
use flatmerge::demo::{write_family_with, FamilyOptions, LlamaShape};
use flatmerge::dtype::{encode_f32, Dtype};
use flatmerge::engine::{merge, MergeOptions};
use flatmerge::io::Checkpoint;

#[test]
fn streamed_ties_equals_the_whole_tensor_reference() {
    streamed_ties_matches_the_reference(FamilyOptions::default());
}

/// Fine-tunes as bf16 training leaves them: whole percents of each task
/// vector tie at the trim threshold, and the inputs come in shards.
#[test]
fn streamed_ties_equals_the_reference_on_bf16_fine_tunes() {
    streamed_ties_matches_the_reference(FamilyOptions {
        bf16_updates: true,
        shard_bytes: Some(1 << 20),
    });
}

fn streamed_ties_matches_the_reference(family: FamilyOptions) {
    let tmp = tempfile::tempdir().unwrap();
    // Tensors of 210 000 and 246 000 elements: above the size where the
    // engine streams the trim; BF16 inputs give many equal magnitudes.
    let shape = LlamaShape {
        vocab: 700,
        hidden: 300,
        intermediate: 820,
        layers: 1,
    };
    write_family_with(tmp.path(), &shape, Dtype::BF16, 1, 3, family).unwrap();
    let densities = [0.3, 0.15];
    let weights = [0.6f32, 0.4];
    let config_path = tmp.path().join("ties.yaml");
    std::fs::write(
        &config_path,
        format!(
            "merge_method: ties\nbase_model: ./C\nparameters: {{normalize: true, lambda: 1.0}}\nmodels:\n  - model: ./A\n    parameters: {{weight: {}, density: {}}}\n  - model: ./B\n    parameters: {{weight: {}, density: {}}}\n",
            weights[0], densities[0], weights[1], densities[1]
        ),
    )
    .unwrap();
    let out = tmp.path().join("merged");
    let options = MergeOptions {
        out_dir: out.clone(),
        ..MergeOptions::default()
    };
    merge(MergeConfig::from_file(&config_path).unwrap(), &options).unwrap();
    let open = |name: &str| Checkpoint::open(&tmp.path().join(name)).unwrap();
    let (c, a, b, merged) = (
        open("C"),
        open("A"),
        open("B"),
        Checkpoint::open(&out).unwrap(),
    );
    let mut streamed = 0;
    let (mut ties, mut large) = (0, 0);
    for info in c.tensors() {
        let name = &info.name;
        let base = c.view(name).unwrap().to_f32_vec();
        let n = base.len();
        let taus: Vec<Vec<f32>> = [&a, &b]
            .iter()
            .zip(densities)
            .map(|(model, density)| {
                let mut tau: Vec<f32> = model
                    .view(name)
                    .unwrap()
                    .to_f32_vec()
                    .iter()
                    .zip(&base)
                    .map(|(w, c)| w - c)
                    .collect();
                let top = TopK::find(std::iter::once(&tau[..]), trim_count(density, n));
                if n >= 1 << 16 {
                    ties += tau
                        .iter()
                        .filter(|&&x| magnitude_key(x) == top.threshold)
                        .count();
                    large += n;
                }
                top.apply(&mut tau, 0);
                tau
            })
            .collect();
        let slices: Vec<&[f32]> = taus.iter().map(Vec::as_slice).collect();
        let mut expected = vec![0f32; n];
        task_arithmetic_combine(
            &base,
            &slices,
            &weights,
            true,
            true,
            1.0,
            &mut Vec::new(),
            &mut expected,
        );
        let mut bytes = vec![0u8; n * 2];
        encode_f32(Dtype::BF16, &expected, &mut bytes);
        assert!(
            merged.view(name).unwrap().data == bytes.as_slice(),
            "{name}"
        );
        streamed += usize::from(n >= 1 << 16);
    }
    assert!(streamed >= 2, "the large tensors take the streamed path");
    if family.bf16_updates {
        assert!(
            ties * 200 > large,
            "over 0.5% of the entries tie at the threshold: {ties} of {large}"
        );
    }
}
