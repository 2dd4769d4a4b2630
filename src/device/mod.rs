//! Runtimes: where a tensor's bytes live and how kernels reach them.
//!
//! `Device` is a plain value (`Cpu`, `Cuda(i)`, `Wgpu(i)`); the runtime behind a GPU device is
//! opened on first use and cached for the life of the process. Opening a device that this
//! machine lacks is an error value, never a panic.

pub mod cpu;
pub mod cuda;
pub mod wgpu;

use std::fmt;

use crate::{Error, Result};

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// The i-th CUDA device (driver ordinal).
    Cuda(usize),
    /// The i-th compute adapter wgpu finds (Vulkan).
    Wgpu(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Wgpu(i) => write!(f, "wgpu:{i}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = Error;
    /// Parses `cpu`, `cuda`, `cuda:N`, `wgpu`, `wgpu:N`, or `auto` (the first GPU this machine
    /// has, else the CPU).
    fn from_str(s: &str) -> Result<Self> {
        let (kind, index) = match s.split_once(':') {
            Some((k, i)) => {
                let i = i.parse::<usize>().map_err(|_| {
                    Error::InvalidArgument(format!("device `{s}`: `{i}` is not a device index"))
                })?;
                (k, i)
            }
            None => (s, 0),
        };
        match kind {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(index)),
            "wgpu" => Ok(Device::Wgpu(index)),
            "auto" => Ok(Device::best_available()),
            _ => Err(Error::InvalidArgument(format!(
                "device `{s}`: expected cpu, cuda[:N], wgpu[:N] or auto"
            ))),
        }
    }
}

/// One device this machine has, with a human-readable description.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub device: Device,
    pub name: String,
}

impl Device {
    /// Every device this machine can open: the CPU, each CUDA device, each wgpu adapter.
    pub fn available() -> Vec<DeviceInfo> {
        let mut out = vec![DeviceInfo { device: Device::Cpu, name: cpu::describe() }];
        if let Ok(n) = cuda::device_count() {
            for i in 0..n {
                let name = cuda::device_name(i).unwrap_or_else(|e| format!("unnamed ({e})"));
                out.push(DeviceInfo { device: Device::Cuda(i), name });
            }
        }
        for (i, info) in wgpu::adapters().into_iter().enumerate() {
            out.push(DeviceInfo { device: Device::Wgpu(i), name: info });
        }
        out
    }

    /// The fastest device present: CUDA, then a wgpu adapter that is not a software
    /// rasterizer, then the CPU.
    pub fn best_available() -> Device {
        if matches!(cuda::device_count(), Ok(n) if n > 0) {
            return Device::Cuda(0);
        }
        if let Some(i) = wgpu::adapter_details().iter().position(|a| !a.is_software) {
            return Device::Wgpu(i);
        }
        Device::Cpu
    }

    /// Opens the runtime behind this device (a no-op for the CPU), so that a missing driver
    /// shows up here as an error rather than inside the first op.
    pub fn open(&self) -> Result<()> {
        match *self {
            Device::Cpu => Ok(()),
            Device::Cuda(i) => cuda::runtime(i).map(|_| ()),
            Device::Wgpu(i) => wgpu::runtime(i).map(|_| ()),
        }
    }

    /// Waits until all work queued on this device has finished.
    pub fn synchronize(&self) -> Result<()> {
        match *self {
            Device::Cpu => Ok(()),
            Device::Cuda(i) => cuda::runtime(i)?.synchronize(),
            Device::Wgpu(i) => wgpu::runtime(i)?.synchronize(),
        }
    }
}

/// A copy to the host queued behind the work already on a device, collected by
/// [`PendingRead::wait`]. The trainer reads a step's loss this way once the next step is
/// queued, so the device never drains between steps for the sake of a log line.
pub struct PendingRead(Pending);

enum Pending {
    /// Read at once (the CPU).
    Ready(Vec<u8>),
    Wgpu(wgpu::PendingRead),
    Cuda(cuda::PendingRead),
}

impl PendingRead {
    /// Bytes already on the host.
    pub fn ready(bytes: Vec<u8>) -> Self {
        PendingRead(Pending::Ready(bytes))
    }

    /// Waits for the copy (and for no work queued after it) and returns the bytes.
    pub fn wait(self) -> Result<Vec<u8>> {
        match self.0 {
            Pending::Ready(b) => Ok(b),
            Pending::Wgpu(p) => p.wait(),
            Pending::Cuda(p) => p.wait(),
        }
    }
}

impl From<wgpu::PendingRead> for PendingRead {
    fn from(p: wgpu::PendingRead) -> Self {
        PendingRead(Pending::Wgpu(p))
    }
}

impl From<cuda::PendingRead> for PendingRead {
    fn from(p: cuda::PendingRead) -> Self {
        PendingRead(Pending::Cuda(p))
    }
}
