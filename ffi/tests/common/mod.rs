//! Helpers of the C ABI tests: build the library, compile C and C++
//! programs against `include/flatmerge.h`, run them, and the Rust mirror
//! of their test data (`ffi/c/testdata.h`).
#![allow(dead_code)]

use engine::demo::{write_family, DemoFamily, LlamaShape};
use engine::dtype::Dtype;
use engine::recorder::{MissingRows, Recorder, RecorderOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The folder of the C sources.
pub fn c_dir() -> PathBuf {
    root().join("ffi/c")
}

/// The folder holding `libflatmerge.so` and `libflatmerge.a`: the profile
/// folder of this test's own build (`target/debug` under `cargo test`),
/// where `cargo build -p flatmerge-ffi` puts them. `cargo test` does not
/// build a cdylib or staticlib for integration tests, so the first call
/// runs that build (quick when they are fresh).
pub fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test>
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let target_dir = profile_dir.parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root())
            .args(["build", "-p", "flatmerge-ffi", "--target-dir"])
            .arg(target_dir);
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(other) => {
                cmd.args(["--profile", other]);
            }
            None => panic!("unexpected test location {}", exe.display()),
        }
        let out = cmd.output().expect("cannot run cargo");
        assert!(
            out.status.success(),
            "cargo build -p flatmerge-ffi failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for lib in ["libflatmerge.so", "libflatmerge.a"] {
            assert!(
                profile_dir.join(lib).is_file(),
                "{lib} missing in {}",
                profile_dir.display()
            );
        }
        profile_dir
    })
}

/// How a program links the library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// `-lflatmerge` against `libflatmerge.so`, with an rpath.
    Shared,
    /// `libflatmerge.a` and the system libraries Rust's std needs.
    Static,
}

/// The system libraries a program linking `libflatmerge.a` needs (what
/// `rustc --print native-static-libs` lists on Linux).
pub const STATIC_LIBS: [&str; 7] = [
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

/// Compiles `sources` (under `ffi/c`) into `out_dir/name` with gcc (C) or
/// g++ (C++), strict warnings as errors, against `include/`.
pub fn compile(sources: &[&str], name: &str, link: Link, out_dir: &Path) -> PathBuf {
    let cpp = sources.iter().any(|s| s.ends_with(".cpp"));
    let exe = out_dir.join(name);
    let mut cmd = Command::new(if cpp { "g++" } else { "gcc" });
    cmd.arg(if cpp { "-std=c++17" } else { "-std=c11" })
        .args([
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-O1",
            "-g",
            "-D_GNU_SOURCE",
        ])
        .arg("-I")
        .arg(root().join("include"));
    for s in sources {
        cmd.arg(c_dir().join(s));
    }
    cmd.arg("-o").arg(&exe);
    let lib = lib_dir();
    match link {
        Link::Shared => {
            cmd.arg("-L")
                .arg(lib)
                .arg("-lflatmerge")
                .arg(format!("-Wl,-rpath,{}", lib.display()));
        }
        Link::Static => {
            cmd.arg(lib.join("libflatmerge.a")).args(STATIC_LIBS);
        }
    }
    if cpp {
        cmd.arg("-pthread");
    }
    let out = cmd.output().expect("cannot run the C compiler");
    assert!(
        out.status.success(),
        "compiling {sources:?} failed:\n{:?}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs a program; panics with its output unless it exits 0.
pub fn run(exe: &Path, args: &[&Path]) -> Output {
    let out = Command::new(exe).args(args).output().expect("cannot run");
    assert!(
        out.status.success(),
        "{} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        exe.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The small SAFE-M family of the tests under `dir`.
pub fn family(dir: &Path) -> DemoFamily {
    let shape = LlamaShape {
        vocab: 64,
        hidden: 32,
        intermediate: 88,
        layers: 2,
    };
    write_family(dir, &shape, Dtype::BF16, 1, 0).unwrap()
}

/// Every file under `dir` (relative path, bytes), sorted.
pub fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path.strip_prefix(dir).unwrap().to_path_buf(), bytes));
            }
        }
    }
    out.sort();
    out
}

/// Asserts that two output directories hold the same files, byte for byte.
pub fn assert_same_files(expected: &Path, actual: &Path) {
    let (e, a) = (files(expected), files(actual));
    let names = |f: &[(PathBuf, Vec<u8>)]| f.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
    assert_eq!(names(&e), names(&a), "different files");
    assert!(e
        .iter()
        .any(|(p, _)| p.extension().is_some_and(|x| x == "safetensors")));
    for ((path, eb), (_, ab)) in e.iter().zip(&a) {
        assert!(eb == ab, "{} differs", path.display());
    }
}

/// `fm_value` of `ffi/c/testdata.h`.
pub fn fm_value(example: u64, row: u64, col: u64, salt: u64) -> f32 {
    let k = ((example * 31 + row * 7 + col * 3 + salt * 11) % 61) as i32 - 30;
    k as f32 / 16.0
}

/// The recorder session of `ffi/c/testdata.h`, pushed from Rust in order.
pub fn rust_recorder_file(path: &Path) {
    const LAYERS: [(&str, usize, usize); 2] = [
        ("model.layers.0.mlp.up_proj", 6, 10),
        ("model.layers.0.mlp.down_proj", 10, 6),
    ];
    let recorder = Recorder::new(RecorderOptions {
        max_examples: 4,
        model: "test model".into(),
        probe: "test probe".into(),
        missing_rows: MissingRows::Zero,
        ..RecorderOptions::default()
    });
    for e in 0..5u64 {
        for (layer, &(name, input, output)) in LAYERS.iter().enumerate() {
            if layer == 1 && e == 2 {
                continue;
            }
            let rows = 1 + (e % 3) as usize;
            let salt = 2 * layer as u64;
            let values = |width: usize, salt: u64| -> Vec<f32> {
                (0..rows * width)
                    .map(|i| fm_value(e, (i / width) as u64, (i % width) as u64, salt))
                    .collect()
            };
            let (x, y) = (values(input, salt), values(output, salt + 1));
            let modality = (e % 2) as u8;
            if layer == 0 {
                recorder.push_f32(name, rows, &x, &y, e, modality).unwrap();
            } else {
                let bits = |v: &[f32]| {
                    v.iter()
                        .map(|f| (f.to_bits() >> 16) as u16)
                        .collect::<Vec<_>>()
                };
                recorder
                    .push_bf16(name, rows, &bits(&x), &bits(&y), e, modality)
                    .unwrap();
            }
        }
    }
    recorder.save(path).unwrap();
}
