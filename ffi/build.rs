//! Gives `libflatmerge.so` the SONAME `libflatmerge.so`, so that programs
//! linked against it by path record the library's name, not the path.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libflatmerge.so");
    }
}
