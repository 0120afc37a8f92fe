//! `ffi/install.sh PREFIX` installs the library, the header, a pkg-config
//! file and a CMake package; the README example builds against each the
//! usual way and runs. (The script is run with `FLATMERGE_LIB_DIR` set to
//! the libraries this test run built, so that it does not build release.)

mod common;

use common::{c_dir, family, lib_dir, root, run};
use std::path::Path;
use std::process::Command;

fn install(prefix: &Path) {
    let out = Command::new("sh")
        .arg(root().join("ffi/install.sh"))
        .arg(prefix)
        .env("FLATMERGE_LIB_DIR", lib_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in [
        "lib/libflatmerge.so",
        "lib/libflatmerge.a",
        "include/flatmerge.h",
        "lib/pkgconfig/flatmerge.pc",
        "lib/pkgconfig/flatmerge-static.pc",
        "lib/cmake/flatmerge/flatmergeConfig.cmake",
        "lib/cmake/flatmerge/flatmergeConfigVersion.cmake",
    ] {
        assert!(prefix.join(file).is_file(), "{file} not installed");
    }
}

fn pkg_config(prefix: &Path, args: &[&str]) -> Vec<String> {
    let out = Command::new("pkg-config")
        .args(args)
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(String::from)
        .collect()
}

#[test]
fn the_example_builds_with_pkg_config_and_cmake_after_install() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("prefix");
    install(&prefix);
    let fam = family(&dir.path().join("family"));
    if Command::new("pkg-config")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("pkg-config not found: skipping the pkg-config and CMake checks");
        return;
    }
    let version = pkg_config(&prefix, &["--modversion", "flatmerge"]);
    assert_eq!(version, [engine::VERSION]);

    // The README's commands: cc example.c $(pkg-config --cflags --libs flatmerge),
    // and flatmerge-static for libflatmerge.a.
    for package in ["flatmerge", "flatmerge-static"] {
        let exe = dir.path().join(format!("example_{package}"));
        let mut cmd = Command::new("cc");
        cmd.arg(c_dir().join("example.c"))
            .arg("-o")
            .arg(&exe)
            .args(pkg_config(&prefix, &["--cflags", "--libs", package]))
            .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()));
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        run(
            &exe,
            &[&fam.config, &dir.path().join(format!("out_{package}"))],
        );
        if let Ok(ldd) = Command::new("ldd").arg(&exe).output() {
            let needs_so = String::from_utf8_lossy(&ldd.stdout).contains("libflatmerge.so");
            assert_eq!(needs_so, package == "flatmerge", "{package}");
        }
    }

    // find_package(flatmerge) with the imported targets, when CMake is here.
    if Command::new("cmake").arg("--version").output().is_err() {
        eprintln!("cmake not found: skipping the CMake package check");
        return;
    }
    let build = dir.path().join("cmake-build");
    let configure = Command::new("cmake")
        .arg("-S")
        .arg(c_dir())
        .arg("-B")
        .arg(&build)
        .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display()))
        .output()
        .unwrap();
    assert!(
        configure.status.success(),
        "cmake configure:\n{}\n{}",
        String::from_utf8_lossy(&configure.stdout),
        String::from_utf8_lossy(&configure.stderr)
    );
    let built = Command::new("cmake")
        .arg("--build")
        .arg(&build)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "cmake build:\n{}\n{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    for (exe, out) in [
        ("example", "out_cmake"),
        ("example_static", "out_cmake_static"),
    ] {
        let out_dir = dir.path().join(out);
        let ran = Command::new(build.join(exe))
            .arg(&fam.config)
            .arg(&out_dir)
            .env("LD_LIBRARY_PATH", prefix.join("lib"))
            .output()
            .unwrap();
        assert!(
            ran.status.success(),
            "{exe} failed:\n{}",
            String::from_utf8_lossy(&ran.stderr)
        );
        assert!(out_dir.join("model.safetensors").is_file());
    }
}
