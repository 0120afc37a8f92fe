//! `include/flatmerge.h` is generated from `ffi/src` by the pinned cbindgen
//! with `ffi/cbindgen.toml`; this test fails when regenerating it changes
//! anything. `FLATMERGE_BLESS=1 cargo test -p flatmerge-ffi --test header`
//! rewrites the checked-in header.

use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate() -> String {
    let config = cbindgen::Config::from_file(root().join("cbindgen.toml")).unwrap();
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root().join("src/lib.rs"))
        .generate()
        .expect("cbindgen could not read ffi/src");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).unwrap()
}

#[test]
fn the_checked_in_header_is_what_cbindgen_generates() {
    let generated = generate();
    let path = root().join("../include/flatmerge.h");
    if std::env::var_os("FLATMERGE_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap();
    if checked_in != generated {
        let line = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| checked_in.lines().count().min(generated.lines().count()));
        panic!(
            "include/flatmerge.h drifted from ffi/src (first difference at line {}); \
             run `FLATMERGE_BLESS=1 cargo test -p flatmerge-ffi --test header` and review the diff",
            line + 1
        );
    }
}

/// Every exported function is `#[no_mangle]` and runs its whole body
/// through the panic boundary (`call(` or `boundary(` first thing).
#[test]
fn every_export_goes_through_the_panic_boundary() {
    let mut exports = Vec::new();
    for entry in std::fs::read_dir(root().join("src")).unwrap() {
        let path = entry.unwrap().path();
        let source = std::fs::read_to_string(&path).unwrap();
        for (i, piece) in source.split("extern \"C\" fn ").enumerate().skip(1) {
            let name: String = piece
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.starts_with("flatmerge_") {
                continue; // a function pointer type, not an export
            }
            exports.push(name.clone());
            let before = source.split("extern \"C\" fn ").nth(i - 1).unwrap();
            let attributes = before.rsplit("///").next().unwrap();
            assert!(
                attributes.contains("#[no_mangle]"),
                "{name} in {} is not #[no_mangle]",
                path.display()
            );
            // The body: from the `{` that ends the signature.
            let signature_end = piece.find(") -> ").map_or_else(
                || piece.find(") {").unwrap(),
                |arrow| arrow + piece[arrow..].find('{').unwrap() - 1,
            );
            let body = piece[signature_end..]
                .split_once('{')
                .unwrap()
                .1
                .trim_start();
            assert!(
                body.starts_with("call(") || body.starts_with("boundary("),
                "{name} in {} does not start with the panic boundary: {}",
                path.display(),
                &body[..body.len().min(60)]
            );
        }
    }
    // The header declares exactly these functions.
    let header = std::fs::read_to_string(root().join("../include/flatmerge.h")).unwrap();
    let mut declared: Vec<String> = header
        .lines()
        .filter(|l| !l.starts_with([' ', '#', '/', '}']) && !l.starts_with("typedef"))
        .filter_map(|l| {
            let (before, _) = l.split_once('(')?;
            let name = before.rsplit([' ', '*']).next()?;
            name.starts_with("flatmerge_").then(|| name.to_string())
        })
        .collect();
    exports.sort();
    declared.sort();
    assert_eq!(exports.len(), 20);
    assert_eq!(exports, declared);
}

/// The header compiles on its own as C99 and C++11, warnings as errors.
#[test]
fn the_header_compiles_alone_as_c99_and_cpp11() {
    let header = root().join("../include/flatmerge.h");
    for (compiler, std, lang) in [("gcc", "-std=c99", "c"), ("g++", "-std=c++11", "c++")] {
        let out = match std::process::Command::new(compiler)
            .args([
                std,
                "-Wall",
                "-Wextra",
                "-Werror",
                "-pedantic",
                "-fsyntax-only",
                "-x",
                lang,
            ])
            .arg(&header)
            .output()
        {
            Ok(out) => out,
            Err(_) => {
                eprintln!("{compiler} not found: skipping");
                continue;
            }
        };
        assert!(
            out.status.success(),
            "{compiler} {std}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
