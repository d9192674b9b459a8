//! rnvme as an fio ioengine.
//!
//! `librnvme_fio.so` is loaded by fio with `ioengine=external:/path/librnvme_fio.so` (or
//! `ioengine=/path/librnvme_fio.so`). A small C file, `c/engine.c`, compiled against the
//! headers of the fio that loads it, is fio's side: it fills in `struct ioengine_ops`, reads
//! fio's structures and calls the functions of [`ffi`] with plain values. This crate is the
//! rest: which controller and namespace a filename names ([`name`]), one controller per
//! process shared by the jobs' threads ([`registry`]), and each job's queue pair, buffers
//! and io_us ([`job`]).
//!
//! Unsafe code is confined to [`ffi`], the boundary with C.
#![deny(unsafe_code)]

pub mod ffi;
pub mod job;
pub mod name;
pub mod registry;

/// Why the engine refused or failed something: one line for fio's log.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Something about the job file or the system.
    #[error("{0}")]
    Message(String),
    /// An I/O request fio should not have made (fio's EINVAL).
    #[error("{0}")]
    Invalid(String),
    /// What the driver said.
    #[error(transparent)]
    Driver(rnvme_driver::Error),
}

impl EngineError {
    pub(crate) fn msg(m: impl Into<String>) -> Self {
        EngineError::Message(m.into())
    }

    pub(crate) fn invalid(m: impl Into<String>) -> Self {
        EngineError::Invalid(m.into())
    }

    /// The errno fio records for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::Invalid(_) => 22, // EINVAL
            EngineError::Message(_) => 22, // EINVAL
            EngineError::Driver(_) => 5,   // EIO
        }
    }
}
