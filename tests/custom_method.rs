//! "Adding a method" (docs/methods.md), done exactly as written there: a
//! toy method implemented outside flatmerge through the public
//! [`flatmerge::methods::Method`] trait and the mergekit-style helpers,
//! added to a [`Registry`], merged end to end, and checked by hand.

use flatmerge::config::params::ParamDef;
use flatmerge::config::{MergeConfig, MethodSettings};
use flatmerge::demo::{write_family, LlamaShape};
use flatmerge::dtype::Dtype;
use flatmerge::engine::MergePart;
use flatmerge::error::Result;
use flatmerge::methods::mergekit::{self, Counts, MergekitTensor};
use flatmerge::methods::{BaseModel, Method, Registry, Roles, SettingsInput, TensorInput};
use flatmerge::plan::{Inputs, Plan};
use flatmerge::report::TensorOutcome;
use flatmerge_suite::{f32_tensors, options, report, tempdir};
use std::any::Any;

/// The toy: the midpoint of the extremes, `(max_k W_k + min_k W_k) / 2`.
struct Midrange;

impl Method for Midrange {
    fn name(&self) -> &'static str {
        "midrange"
    }
    fn summary(&self) -> &'static str {
        "the midpoint of the models' extremes"
    }
    fn roles(&self) -> Roles {
        Roles::AllModels
    }
    fn base_model(&self) -> BaseModel {
        BaseModel::Forbidden
    }
    fn params(&self) -> Vec<ParamDef> {
        Vec::new()
    }
    fn settings(&self, input: &SettingsInput<'_>) -> Result<MethodSettings> {
        mergekit::settings(self, Counts::AtLeastOne, input)
    }
    fn plan(&self, config: &MergeConfig, inputs: &Inputs) -> Result<Plan> {
        mergekit::plan(config, inputs, &|_, _| None)
    }
    fn merge_tensor(
        &self,
        merge: &MergePart,
        _state: &(dyn Any + Send + Sync),
        input: &TensorInput<'_>,
    ) -> Result<(Vec<u8>, TensorOutcome)> {
        let t = MergekitTensor::new(merge, input)?;
        let bytes = t.map_elements(|xs| {
            let max = xs.iter().copied().fold(f32::MIN, f32::max);
            let min = xs.iter().copied().fold(f32::MAX, f32::min);
            (max + min) / 2.0
        });
        Ok((bytes, TensorOutcome::default()))
    }
    fn report_parameters(&self, config: &MergeConfig) -> serde_json::Value {
        mergekit::report_parameters(config)
    }
}

static MIDRANGE: Midrange = Midrange;

const SHAPE: LlamaShape = LlamaShape {
    vocab: 64,
    hidden: 32,
    intermediate: 88,
    layers: 2,
};

#[test]
fn a_method_of_ones_own_merges_through_the_registry() {
    let dir = tempdir();
    write_family(dir.path(), &SHAPE, Dtype::F32, 2, 5).expect("family");
    let yaml = "merge_method: midrange\nmodels:\n  - model: ./A\n  - model: ./B\n  - model: ./B2\n";
    // The built-in registry does not know it…
    let e = MergeConfig::from_yaml(yaml, dir.path(), None).unwrap_err();
    assert!(e.to_string().contains("`midrange` is unknown"), "{e}");
    // …a registry with it does.
    let registry = Registry::builtin().with(&MIDRANGE);
    let config = MergeConfig::from_yaml_in(yaml, dir.path(), None, &registry).expect("config");
    assert_eq!(config.method.as_str(), "midrange");
    assert_eq!(config.contributors(), vec![0, 1, 2]);
    let out = dir.path().join("merged");
    flatmerge::engine::PreparedMerge::new(config)
        .and_then(|p| p.run(&options(&out, Some(2), None)))
        .expect("merge");
    let models: Vec<_> = ["A", "B", "B2"]
        .iter()
        .map(|m| f32_tensors(&dir.path().join(m)))
        .collect();
    let merged = f32_tensors(&out);
    assert_eq!(merged.len(), models[0].len());
    for (name, values) in &merged {
        for (i, v) in values.iter().enumerate() {
            let xs: Vec<f32> = models.iter().map(|m| m[name][i]).collect();
            let want = (xs.iter().copied().fold(f32::MIN, f32::max)
                + xs.iter().copied().fold(f32::MAX, f32::min))
                / 2.0;
            assert_eq!(v.to_bits(), want.to_bits(), "{name}[{i}]");
        }
    }
    assert_eq!(report(&out)["method"], "midrange");
    // Validation comes from the declared parameters: none are taken.
    let e = MergeConfig::from_yaml_in(
        &format!("{yaml}parameters:\n  density: 0.5\n"),
        dir.path(),
        None,
        &registry,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("unknown parameter for midrange"),
        "{e}"
    );
}

#[test]
fn the_readme_lists_every_registered_method_with_its_parameters() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let table = flatmerge::methods::reference_table();
    if std::env::var_os("FLATMERGE_BLESS").is_some() && !readme.contains(&table) {
        let start = readme
            .find("| method | what it does |")
            .expect("a method table in the README");
        let end = start + readme[start..].find("\n\n").expect("the table ends");
        let updated = format!("{}{}{}", &readme[..start], table.trim_end(), &readme[end..]);
        std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"), updated).expect("write");
        return;
    }
    assert!(
        readme.contains(&table),
        "README.md's method table differs from the registry; run `FLATMERGE_BLESS=1 cargo test --test custom_method` to regenerate it:\n{table}"
    );
}
