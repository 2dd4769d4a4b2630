//! Errors are values that say what was wrong and where. User input never panics.

use std::fmt;

use crate::{DType, Device, Shape};

/// Everything that can go wrong in tuna, each variant naming both sides of a mismatch.
#[derive(Debug)]
pub enum Error {
    /// Two shapes that had to agree did not.
    ShapeMismatch { op: &'static str, lhs: Shape, rhs: Shape },
    /// A shape is not valid for an op (wrong rank, zero size where one is needed, ...).
    BadShape { op: &'static str, shape: Shape, expected: String },
    /// The number of host elements does not match the shape.
    ElementCount { shape: Shape, got: usize },
    /// Two dtypes that had to agree did not, or an op does not take this dtype.
    DTypeMismatch { op: &'static str, lhs: DType, rhs: DType },
    UnsupportedDType { op: &'static str, dtype: DType },
    /// Two tensors live on different devices.
    DeviceMismatch { op: &'static str, lhs: Device, rhs: Device },
    /// An op has no kernel for this device (yet); the message says which.
    Unsupported { op: &'static str, device: Device },
    /// An index (token id, class id) is outside its range.
    IndexOutOfRange { op: &'static str, index: i64, position: usize, bound: usize },
    /// A device cannot be opened: no driver, no adapter, index past the count.
    DeviceUnavailable { device: Device, reason: String },
    /// An error from the CUDA driver, NVRTC or cuBLAS.
    Cuda { context: String, message: String },
    /// An error from wgpu (buffer mapping, pipeline creation, ...).
    Wgpu { context: String, message: String },
    /// Autograd misuse: two tapes in one op, backward from a non-scalar, ...
    Tape(String),
    /// A value passed by the user is out of its domain.
    InvalidArgument(String),
    /// A file that could not be read or is not what it should be; `detail` names the tensor,
    /// field or line.
    File { path: std::path::PathBuf, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ShapeMismatch { op, lhs, rhs } => {
                write!(f, "{op}: shape mismatch, lhs {lhs} vs rhs {rhs}")
            }
            Error::BadShape { op, shape, expected } => {
                write!(f, "{op}: bad shape {shape}, expected {expected}")
            }
            Error::ElementCount { shape, got } => write!(
                f,
                "shape {shape} holds {} elements but {got} were given",
                shape.elem_count()
            ),
            Error::DTypeMismatch { op, lhs, rhs } => {
                write!(f, "{op}: dtype mismatch, lhs {lhs} vs rhs {rhs}")
            }
            Error::UnsupportedDType { op, dtype } => write!(f, "{op}: dtype {dtype} is not supported"),
            Error::DeviceMismatch { op, lhs, rhs } => {
                write!(f, "{op}: device mismatch, lhs on {lhs} vs rhs on {rhs}")
            }
            Error::Unsupported { op, device } => write!(
                f,
                "{op}: no kernel for {device} yet; copy the tensor to the CPU with .to_device(&Device::Cpu)"
            ),
            Error::IndexOutOfRange { op, index, position, bound } => write!(
                f,
                "{op}: index {index} at position {position} is out of range 0..{bound}"
            ),
            Error::DeviceUnavailable { device, reason } => write!(f, "{device} is not available: {reason}"),
            Error::Cuda { context, message } => write!(f, "CUDA error in {context}: {message}"),
            Error::Wgpu { context, message } => write!(f, "wgpu error in {context}: {message}"),
            Error::Tape(msg) => write!(f, "autograd: {msg}"),
            Error::InvalidArgument(msg) => write!(f, "invalid argument: {msg}"),
            Error::File { path, detail } => write!(f, "{}: {detail}", path.display()),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    pub(crate) fn cuda(context: impl Into<String>, e: impl fmt::Debug) -> Self {
        Error::Cuda { context: context.into(), message: format!("{e:?}") }
    }
    pub(crate) fn file(path: impl Into<std::path::PathBuf>, detail: impl Into<String>) -> Self {
        Error::File { path: path.into(), detail: detail.into() }
    }
    pub(crate) fn wgpu(context: impl Into<String>, e: impl fmt::Display) -> Self {
        Error::Wgpu { context: context.into(), message: e.to_string() }
    }
}
