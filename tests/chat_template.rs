//! `chat_template:` (mergekit's key): a built-in template, Jinja text, or
//! `auto` (the plurality of the input models' templates, ties to the first
//! in config order) set in the output's `tokenizer_config.json` and
//! `chat_template.jinja`, listed in the report; bad values are an error
//! naming the key and line.

use flatmerge::chat_template::{model_template, ChatTemplate, BUILTIN};
use flatmerge_suite::{report, tempdir, try_merge_yaml, write_f32_model};
use std::path::Path;

fn model(dir: &Path, name: &str, template: Option<&str>, as_file: bool) {
    let d = dir.join(name);
    write_f32_model(
        &d,
        &[("model.norm.weight", vec![4], vec![1.0, 2.0, 3.0, 4.0])],
    );
    let mut config = serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast"});
    match template {
        Some(t) if as_file => std::fs::write(d.join("chat_template.jinja"), t).unwrap(),
        Some(t) => config["chat_template"] = t.into(),
        None => {}
    }
    std::fs::write(d.join("tokenizer_config.json"), config.to_string()).unwrap();
}

fn merge(dir: &Path, template: &str, extra: &str) -> flatmerge::Result<std::path::PathBuf> {
    let out = dir.join("out");
    let _ = std::fs::remove_dir_all(&out);
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - model: ./A\n    parameters:\n      weight: 1.0\n  - model: ./B\n    parameters:\n      weight: 1.0\n  - model: ./C\n    parameters:\n      weight: 1.0\nchat_template: {template}\n{extra}"
    );
    try_merge_yaml(dir, &yaml, 0, Some(1), &out).map(|_| out)
}

const T1: &str = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
const T2: &str = "{% for m in messages %}[{{ m['role'] }}]{% endfor %}";

#[test]
fn a_builtin_template_is_set_in_the_tokenizer_config() {
    let dir = tempdir();
    model(dir.path(), "A", Some(T2), false);
    model(dir.path(), "B", None, false);
    model(dir.path(), "C", None, false);
    let out = merge(dir.path(), "chatml", "").unwrap();
    let chatml = BUILTIN.iter().find(|(n, _)| *n == "chatml").unwrap().1;
    assert_eq!(model_template(&out).as_deref(), Some(chatml.trim()));
    assert!(chatml.contains("<|im_start|>"));
    let r = report(&out);
    assert_eq!(r["chat_template"]["chosen"], "chatml");
    assert_eq!(
        r["chat_template"]["written_to"],
        serde_json::json!(["tokenizer_config.json"])
    );
}

#[test]
fn auto_takes_the_template_most_models_have() {
    let dir = tempdir();
    model(dir.path(), "A", Some(T2), false);
    model(dir.path(), "B", Some(T1), true);
    model(dir.path(), "C", Some(&format!("  {T1}\n")), false);
    let out = merge(dir.path(), "auto", "").unwrap();
    // The output's names come from A: its tokenizer_config.json gets T1.
    assert_eq!(model_template(&out).as_deref(), Some(T1));
    // A tie goes to the first model in config order.
    let d2 = tempdir();
    model(d2.path(), "A", Some(T2), false);
    model(d2.path(), "B", Some(T1), false);
    model(d2.path(), "C", None, false);
    let out = merge(d2.path(), "auto", "").unwrap();
    assert_eq!(model_template(&out).as_deref(), Some(T2));
    // No model has one: nothing is set.
    let d3 = tempdir();
    for m in ["A", "B", "C"] {
        model(d3.path(), m, None, false);
    }
    let out = merge(d3.path(), "auto", "").unwrap();
    assert_eq!(model_template(&out), None);
    assert_eq!(report(&out)["chat_template"]["found"], false);
}

#[test]
fn jinja_text_is_written_as_it_is_and_bad_values_are_errors() {
    let dir = tempdir();
    for m in ["A", "B", "C"] {
        model(dir.path(), m, None, false);
    }
    let out = merge(dir.path(), &format!("\"{T2}\""), "").unwrap();
    assert_eq!(model_template(&out).as_deref(), Some(T2));
    for (value, needle) in [("chatmll", "neither `auto`"), ("[1, 2]", "expected `auto`")] {
        let e = merge(dir.path(), value, "").unwrap_err().to_string();
        assert!(
            e.contains("chat_template") && e.contains(needle) && e.contains("line 12"),
            "{e}"
        );
    }
    assert_eq!(ChatTemplate::parse("auto"), Ok(ChatTemplate::Auto));
    assert!(matches!(
        ChatTemplate::parse(T1),
        Ok(ChatTemplate::Literal(_))
    ));
}
