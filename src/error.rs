//! The one error type of the crate. Every failure a caller can cause is a variant
//! here with a message that names what was wrong; library code never panics on
//! caller data.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, each with what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint or tensor file is malformed (truncated, bad header, a damaged
    /// record, ...).
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it, and where.
        reason: String,
    },
    /// A tensor the model needs is absent.
    #[error("missing tensor `{key}`{hint}")]
    MissingKey {
        /// The tensor's full name (PyTorch's state-dict key).
        key: String,
        /// Where it was looked for, and other names it may have, appended to the
        /// message as is (may be empty).
        hint: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{key}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// The tensor (a checkpoint key, or an op's argument such as `linear weight`).
        key: String,
        /// The shape required.
        expected: Vec<usize>,
        /// The shape given.
        found: Vec<usize>,
    },
    /// A tensor has a dtype this crate does not accept.
    #[error("tensor `{key}`: expected dtype {expected}, found {found}")]
    DType {
        /// The tensor.
        key: String,
        /// The dtypes accepted there.
        expected: String,
        /// The dtype given.
        found: String,
    },
    /// An input or weight holds NaN or infinity.
    #[error("tensor `{key}` holds a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        /// The tensor.
        key: String,
        /// The first non-finite element's index in row-major order.
        index: usize,
        /// Its value (NaN or ±infinity).
        value: f64,
    },
    /// A size computation overflowed `usize`, or a size is out of range.
    #[error("size overflow: {0}")]
    Overflow(String),
    /// An allocation the sizes asked for could not be made. On Linux a host
    /// allocation of 64 MiB or more is first measured against the memory the
    /// process can still get ([`crate::tensor::memory_available`]), so a batch
    /// too large for the machine is this error, not the kernel's
    /// out-of-memory killer.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// Arguments that do not fit together (op shapes, config, batch 0, ...).
    #[error("{0}")]
    Invalid(String),
    /// The LLM output does not contain the signal tokens as required.
    #[error("sequence {batch}: {reason}")]
    SignalTokens {
        /// The sequence (index in the batch).
        batch: usize,
        /// Which signal token is missing or out of order.
        reason: String,
    },
    /// A backend or device was asked for that is not available here.
    #[error("backend `{backend}` is not available: {reason}")]
    Unavailable {
        /// The backend's name (`cpu`, `wgpu`, `cuda`).
        backend: String,
        /// Why: no adapter or device, no driver library, no NVRTC, a feature the
        /// device lacks, ...
        reason: String,
    },
    /// A backend reported a failure (driver, compiler, device error).
    #[error("{backend}: {message}")]
    Backend {
        /// The backend's name ([`crate::ops::Backend::name`]).
        backend: String,
        /// What failed, with the driver's, compiler's or device's own message.
        message: String,
    },
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
