//! Errors of the std layer. Every error names the file and, where there is
//! one, the tensor (or layer, or config key) and the problem, so that one
//! line tells the user what to fix.

use std::fmt;
use std::path::{Path, PathBuf};

/// What went wrong, for callers that branch on it (the CLI's exit codes,
/// the C ABI's status codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A file could not be opened, read, written or renamed.
    Io,
    /// A checkpoint file is not valid safetensors (header, offsets, sizes).
    Format,
    /// A tensor has a dtype flatmerge does not merge.
    UnsupportedDtype,
    /// A PyTorch pickle checkpoint (`*.bin`), which flatmerge never loads.
    Pickle,
    /// A checkpoint path holds nothing flatmerge can read.
    NotFound,
    /// An activation statistics file is malformed or does not fit the weights.
    Stats,
    /// A merge config is malformed (unknown key, wrong type, bad value).
    Config,
    /// Names, shapes or statistics of the inputs do not fit together.
    Plan,
    /// The output exists and `force` was not given.
    OutputExists,
    /// A value is not allowed (for example a NaN where numbers are needed).
    InvalidInput,
    /// The caller cancelled the merge.
    Cancelled,
}

impl ErrorKind {
    /// Every kind, in declaration order (the C ABI numbers them 1, 2, … in
    /// this order; a test there fails when a kind is added without a code).
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::Io,
        ErrorKind::Format,
        ErrorKind::UnsupportedDtype,
        ErrorKind::Pickle,
        ErrorKind::NotFound,
        ErrorKind::Stats,
        ErrorKind::Config,
        ErrorKind::Plan,
        ErrorKind::OutputExists,
        ErrorKind::InvalidInput,
        ErrorKind::Cancelled,
    ];
}

/// An error of the std layer: kind, file, tensor (optional) and problem.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    file: Option<PathBuf>,
    tensor: Option<String>,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with a message saying what is wrong.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            file: None,
            tensor: None,
            message: message.into(),
            source: None,
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: &Path, err: std::io::Error) -> Self {
        Error::new(ErrorKind::Io, err.to_string())
            .with_file(path)
            .with_source(err)
    }

    /// Names the file the error is about.
    pub fn with_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(path.into());
        self
    }

    /// Names the tensor (or layer, or config key) the error is about.
    pub fn with_tensor(mut self, tensor: impl Into<String>) -> Self {
        self.tensor = Some(tensor.into());
        self
    }

    /// Replaces the problem's description (kind, file and tensor stay).
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// Keeps the underlying error for `source()`.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The file the error is about, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The tensor (or layer, or key) the error is about, if any.
    pub fn tensor(&self) -> Option<&str> {
        self.tensor.as_deref()
    }

    /// The problem, without file and tensor.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(tensor) = &self.tensor {
            write!(f, "`{tensor}`: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
