//! Whether python3 can import the peers a test compares against. Shared by
//! every crate's Python-backed tests through `#[path]`, so the skip and the
//! `FLATMERGE_REQUIRE_PYTHON` rule read the same everywhere.

use std::io::Write;
use std::process::Command;

/// `true` when `python3 -c "import {modules}"` succeeds; otherwise panics
/// under `FLATMERGE_REQUIRE_PYTHON`, or says why `what` is skipped and
/// returns `false`.
pub fn python_ready(modules: &str, what: &str) -> bool {
    let required = std::env::var_os("FLATMERGE_REQUIRE_PYTHON").is_some();
    let problem = match Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
    {
        Ok(out) if out.status.success() => return true,
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            format!(
                "python3 lacks {modules} ({})",
                stderr.trim().lines().last().unwrap_or("no message")
            )
        }
        Err(e) => format!("cannot run python3: {e}"),
    };
    assert!(!required, "FLATMERGE_REQUIRE_PYTHON is set but {problem}");
    // Written to the process's stderr, not through `eprintln!`, which the
    // test harness captures: a skip must be visible in a passing run.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {what}: {problem}; install with `python3 -m pip install -r tests/python/requirements.txt`"
    );
    false
}
