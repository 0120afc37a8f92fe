//! One Python exception class per library error kind, all subclasses of
//! `flatmerge.Error`, each carrying the library's message (file, tensor,
//! problem) and the parts separately as `file`, `tensor` and `problem`.

use engine::{Error, ErrorKind};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    flatmerge,
    FlatmergeError,
    PyException,
    "Base class of every flatmerge error; `file`, `tensor` and `problem` give the parts of the message."
);

macro_rules! kinds {
    ($($kind:ident => $class:ident, $doc:literal;)*) => {
        $(create_exception!(flatmerge, $class, FlatmergeError, $doc);)*

        /// The class of `kind`.
        fn class_of(py: Python<'_>, kind: ErrorKind) -> Bound<'_, pyo3::types::PyType> {
            match kind {
                $(ErrorKind::$kind => py.get_type::<$class>(),)*
                // A kind added to the library after these bindings.
                _ => py.get_type::<FlatmergeError>(),
            }
        }

        /// Adds the classes to the module under their Python names.
        pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
            let py = m.py();
            m.add("Error", py.get_type::<FlatmergeError>())?;
            $(m.add(stringify!($class), py.get_type::<$class>())?;)*
            let names = pyo3::types::PyList::empty(py);
            $(names.append((stringify!($kind), stringify!($class)))?;)*
            m.add("ERROR_KINDS", names)?;
            Ok(())
        }
    };
}

kinds! {
    Io => IoError, "A file could not be opened, read, written or renamed.";
    Format => FormatError, "A checkpoint file is not valid safetensors.";
    UnsupportedDtype => UnsupportedDtypeError, "A tensor has a dtype flatmerge does not merge.";
    Pickle => PickleError, "A PyTorch pickle checkpoint (`*.bin`), which flatmerge never loads.";
    NotFound => NotFoundError, "A checkpoint path holds nothing flatmerge can read.";
    Stats => StatsError, "An activation statistics file is malformed or does not fit the weights.";
    Config => ConfigError, "A merge config is malformed (unknown key, wrong type, bad value).";
    Plan => PlanError, "Names, shapes or statistics of the inputs do not fit together.";
    OutputExists => OutputExistsError, "The output exists and `force` was not given.";
    InvalidInput => InvalidInputError, "A value is not allowed (a NaN, a bad shape, a bad argument).";
    Cancelled => CancelledError, "The merge was cancelled (by the progress callback).";
}

/// The Python exception for a library error, with the same message.
pub fn to_py(err: Error) -> PyErr {
    Python::attach(|py| {
        let class = class_of(py, err.kind());
        let value = match class.call1((err.to_string(),)) {
            Ok(value) => value,
            Err(e) => return e,
        };
        let file = err.file().map(|f| f.display().to_string());
        // Attributes on a fresh exception instance cannot fail to be set.
        let _ = value.setattr("file", file);
        let _ = value.setattr("tensor", err.tensor());
        let _ = value.setattr("problem", err.message());
        PyErr::from_value(value)
    })
}

/// `InvalidInputError` with `message` (arguments the library never sees).
pub fn invalid(message: impl Into<String>) -> PyErr {
    to_py(Error::new(ErrorKind::InvalidInput, message))
}

/// Converts library results.
pub trait IntoPy<T> {
    /// The value, or the error as its Python exception.
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for engine::Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
