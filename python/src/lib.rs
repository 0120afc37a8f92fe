//! `flatmerge._flatmerge`: the native module of the `flatmerge` Python
//! package. Like the CLI and the C ABI it is a face: it converts Python
//! values, calls the library and converts the results; the Python layer
//! (`python/flatmerge/`) builds the user-facing API on top of it.

use pyo3::prelude::*;

mod errors;
mod merge;
mod recorder;

/// The native module.
#[pymodule]
fn _flatmerge(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", engine::VERSION)?;
    errors::register(m)?;
    merge::register(m)?;
    recorder::register(m)?;
    Ok(())
}
