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

/// The fio this engine was built for (`fio-3.33`): its source's version.
pub const BUILT_FOR: &str = env!("RNVME_FIO_VERSION");

/// Why the engine cannot run in the fio whose version string is `running`: it reads fio's
/// structures as the headers it was built with lay them out, which differ between versions.
pub fn version_mismatch(running: &str) -> Option<String> {
    (running != BUILT_FOR).then(|| {
        format!(
            "this engine was built for {BUILT_FOR} but is loaded into {running}: rebuild it \
             against that fio's source (tools/fio-source, or RNVME_FIO_SRC, then cargo build -p \
             rnvme-fio)"
        )
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_fio_is_refused_by_name() {
        assert_eq!(version_mismatch(BUILT_FOR), None);
        let why = version_mismatch("fio-3.36").unwrap();
        assert!(why.contains(&format!(
            "built for {BUILT_FOR} but is loaded into fio-3.36"
        )));
        assert!(version_mismatch("").is_some());
        assert!(BUILT_FOR.starts_with("fio-"), "{BUILT_FOR}");
    }
}
