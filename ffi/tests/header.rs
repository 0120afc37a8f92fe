//! `include/flatmerge.h` must declare exactly the functions the C ABI exports.

use std::collections::BTreeSet;

fn exported(source: &str) -> BTreeSet<String> {
    source
        .split("pub extern \"C\" fn ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next().map(|n| n.trim().to_string()))
        .collect()
}

fn declared(header: &str) -> BTreeSet<String> {
    header
        .lines()
        .filter(|l| !l.trim_start().starts_with('*') && !l.trim_start().starts_with("/*"))
        .filter_map(|l| {
            let before = l.split('(').next()?;
            let name = before
                .rsplit(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()?;
            name.starts_with("flatmerge_").then(|| name.to_string())
        })
        .collect()
}

#[test]
fn header_declares_every_export_and_nothing_else() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let source = std::fs::read_to_string(format!("{root}/ffi/src/lib.rs")).unwrap();
    let header = std::fs::read_to_string(format!("{root}/include/flatmerge.h")).unwrap();
    let (exported, declared) = (exported(&source), declared(&header));
    assert!(!exported.is_empty());
    assert_eq!(
        exported, declared,
        "include/flatmerge.h drifted from ffi/src/lib.rs"
    );
}
