//! The functions `c/engine.c` calls: fio's callbacks, with fio's structures already read into
//! plain values. Every pointer here comes from that file, which keeps the promises the
//! `SAFETY` comments name. No panic crosses into C: each entry point catches them and
//! reports a failure instead.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use rnvme_driver::queue::DataPointerMode;

use crate::job::{Job, JobParams, Op, Queued};
use crate::{name, registry, EngineError};

/// Copies `msg` into the C buffer `err` of `len` bytes, NUL-terminated, cut if needed.
///
/// # Safety
/// `err` is null or points to `len` writable bytes.
unsafe fn put(err: *mut c_char, len: usize, msg: &str) {
    if err.is_null() || len == 0 {
        return;
    }
    let n = msg.len().min(len - 1);
    // SAFETY: the caller promises `len` writable bytes at `err`; n + 1 <= len.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), err.cast::<u8>(), n);
        *err.add(n) = 0;
    }
}

/// Runs `f`, turning a panic into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(EngineError::msg(format!("internal error: {what}")))
    })
}

/// # Safety
/// `s` is a NUL-terminated string that lives for the call.
unsafe fn text<'a>(s: *const c_char) -> Result<&'a str, EngineError> {
    if s.is_null() {
        return Err(EngineError::msg("no text where one was expected"));
    }
    // SAFETY: the caller promises a NUL-terminated string.
    unsafe { CStr::from_ptr(s) }
        .to_str()
        .map_err(|_| EngineError::msg("text that is not UTF-8"))
}

/// The job behind the opaque pointer `engine.c` keeps in `td->io_ops_data`.
///
/// # Safety
/// `job` came from [`rnvme_fio_job_new`], was not freed, and is used by one thread at a time
/// (fio calls a job's engine callbacks from its own thread).
unsafe fn job<'a>(job: *mut c_void) -> &'a mut Job {
    // SAFETY: as promised by the caller.
    unsafe { &mut *job.cast::<Job>() }
}

/// 0 if the engine runs in the fio it was built for (`running` is that fio's
/// `fio_version_string`), an errno with the reason in `err` otherwise.
///
/// # Safety
/// `running` is a NUL-terminated string; `err` has `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn rnvme_fio_check_version(
    running: *const c_char,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    // SAFETY: `running` is a NUL-terminated string (caller).
    let r = unsafe { text(running) }.and_then(|v| match crate::version_mismatch(v) {
        None => Ok(()),
        Some(why) => Err(EngineError::msg(why)),
    });
    // SAFETY: `err` has `errlen` bytes (caller).
    unsafe { status(r, err, errlen) }
}

/// Setup of fio's file `name`: opens its controller (shared by the process) and checks that
/// the namespace exists; writes the namespace's size in bytes and its LBA size (`engine.c`
/// checks the job's block sizes against it). 0 on success, an errno with the reason in `err`
/// otherwise.
///
/// # Safety
/// `name` is a NUL-terminated string; `size` and `lba` are writable; `err` has `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn rnvme_fio_file_info(
    name: *const c_char,
    hugepages: c_int,
    size: *mut u64,
    lba: *mut u32,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    let r = guarded(|| {
        // SAFETY: `name` is a NUL-terminated string (caller).
        let t = name::parse(unsafe { text(name) }?).map_err(EngineError::Message)?;
        let ctrl = registry::controller(&t.bdf, hugepages != 0)?;
        let ns = crate::job::namespace(&ctrl, &t)?;
        Ok((ns.size_lbas * ns.lba_size as u64, ns.lba_size))
    });
    match r {
        Ok((s, l)) => {
            // SAFETY: `size` and `lba` are writable (caller).
            unsafe {
                *size = s;
                *lba = l;
            }
            0
        }
        Err(e) => {
            // SAFETY: `err` has `errlen` bytes (caller).
            unsafe { put(err, errlen, &e.to_string()) };
            e.errno()
        }
    }
}

/// A new job: `depth` io_us of at most `max_bs` bytes; `dptr` 0 auto, 1 PRP, 2 SGL; `fua`
/// for writes; `ring_at_commit` to ring the doorbell at fio's commit rather than at its next
/// reap; `stats` to account where the job's time goes ([`rnvme_fio_job_report`]). Null with
/// the reason in `err` on failure.
///
/// # Safety
/// `err` has `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn rnvme_fio_job_new(
    depth: u32,
    max_bs: u64,
    dptr: c_int,
    fua: c_int,
    ring_at_commit: c_int,
    stats: c_int,
    err: *mut c_char,
    errlen: usize,
) -> *mut c_void {
    let r = guarded(|| {
        let dptr = match dptr {
            0 => DataPointerMode::Auto,
            1 => DataPointerMode::Prp,
            2 => DataPointerMode::Sgl,
            d => return Err(EngineError::msg(format!("rnvme_dptr {d} unknown"))),
        };
        Job::new(JobParams {
            depth,
            max_bs,
            dptr,
            fua: fua != 0,
            ring_at_commit: ring_at_commit != 0,
            stats: stats != 0,
        })
    });
    match r {
        Ok(j) => Box::into_raw(Box::new(j)).cast(),
        Err(e) => {
            // SAFETY: `err` has `errlen` bytes (caller).
            unsafe { put(err, errlen, &e.to_string()) };
            std::ptr::null_mut()
        }
    }
}

/// Adds fio's file `fileno`, named `name`, to `job`. 0, or an errno with the reason in `err`.
///
/// # Safety
/// See [`job`]; `name` is a NUL-terminated string; `err` has `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn rnvme_fio_job_add_file(
    j: *mut c_void,
    fileno: u32,
    name: *const c_char,
    hugepages: c_int,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    // SAFETY: as promised by the caller.
    let j = unsafe { job(j) };
    let r = guarded(|| {
        // SAFETY: `name` is a NUL-terminated string (caller).
        let t = name::parse(unsafe { text(name) }?).map_err(EngineError::Message)?;
        let ctrl = registry::controller(&t.bdf, hugepages != 0)?;
        j.add_file(fileno, &t, ctrl)
    });
    // SAFETY: `err` has `errlen` bytes (caller).
    unsafe { status(r, err, errlen) }
}

/// Creates the job's queue pair. 0, or an errno with the reason in `err`.
///
/// # Safety
/// See [`job`]; `err` has `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn rnvme_fio_job_start(
    j: *mut c_void,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    // SAFETY: as promised by the caller.
    let j = unsafe { job(j) };
    let r = guarded(|| j.start());
    // SAFETY: `err` has `errlen` bytes (caller).
    unsafe { status(r, err, errlen) }
}

/// # Safety
/// `err` has `errlen` bytes.
unsafe fn status(r: Result<(), EngineError>, err: *mut c_char, errlen: usize) -> c_int {
    match r {
        Ok(()) => 0,
        Err(e) => {
            // SAFETY: as promised by the caller.
            unsafe { put(err, errlen, &e.to_string()) };
            e.errno()
        }
    }
}

/// `len` bytes of DMA memory for fio's I/O buffers; null with the reason in `err`.
///
/// # Safety
/// See [`job`]; `err` has `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn rnvme_fio_iomem_alloc(
    j: *mut c_void,
    len: usize,
    err: *mut c_char,
    errlen: usize,
) -> *mut c_void {
    // SAFETY: as promised by the caller.
    let j = unsafe { job(j) };
    match guarded(|| j.iomem_alloc(len)) {
        Ok(addr) => addr as *mut c_void,
        Err(e) => {
            // SAFETY: `err` has `errlen` bytes (caller).
            unsafe { put(err, errlen, &e.to_string()) };
            std::ptr::null_mut()
        }
    }
}

/// Gives back the memory of [`rnvme_fio_iomem_alloc`]; fio no longer touches it.
///
/// # Safety
/// See [`job`].
#[no_mangle]
pub unsafe extern "C" fn rnvme_fio_iomem_free(j: *mut c_void) {
    // SAFETY: as promised by the caller.
    let j = unsafe { job(j) };
    let _ = guarded(|| {
        j.iomem_free();
        Ok(())
    });
}

/// Queues io_u `index`: `op` (0 read, 1 write, 2 trim, 3 flush) of `len` bytes at `offset` of
/// fio's file `fileno`, its data at `buf`. 0 queued, 1 busy (reap, then try again), or a
/// negative errno with the reason in `err`.
///
/// # Safety
/// See [`job`]; `err` has `errlen` bytes. `buf` is only compared with the engine's buffer,
/// never dereferenced here.
#[no_mangle]
pub unsafe extern "C" fn rnvme_fio_queue(
    j: *mut c_void,
    fileno: u32,
    op: c_int,
    offset: u64,
    len: u64,
    buf: *const c_void,
    index: u32,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    // SAFETY: as promised by the caller.
    let j = unsafe { job(j) };
    let r = guarded(|| {
        let op = match op {
            0 => Op::Read,
            1 => Op::Write,
            2 => Op::Trim,
            3 => Op::Flush,
            o => return Err(EngineError::invalid(format!("operation {o} unknown"))),
        };
        j.queue(fileno, op, offset, len, buf as usize, index)
    });
    match r {
        Ok(Queued::Queued) => 0,
        Ok(Queued::Busy) => 1,
        Err(e) => {
            // SAFETY: `err` has `errlen` bytes (caller).
            unsafe { put(err, errlen, &e.to_string()) };
            -e.errno()
        }
    }
}

/// Rings the doorbell for the io_us queued since the last commit.
///
/// # Safety
/// See [`job`].
#[no_mangle]
pub unsafe extern "C" fn rnvme_fio_commit(j: *mut c_void) {
    // SAFETY: as promised by the caller.
    let j = unsafe { job(j) };
    let _ = guarded(|| {
        j.commit();
        Ok(())
    });
}

/// Reaps at least `min` and at most `max` io_us, waiting at most `timeout_ns` (negative: no
/// limit). Returns how many.
///
/// # Safety
/// See [`job`].
#[no_mangle]
pub unsafe extern "C" fn rnvme_fio_getevents(
    j: *mut c_void,
    min: u32,
    max: u32,
    timeout_ns: i64,
) -> c_int {
    // SAFETY: as promised by the caller.
    let j = unsafe { job(j) };
    let timeout = u64::try_from(timeout_ns).ok().map(Duration::from_nanos);
    guarded(|| Ok(j.getevents(min as usize, max as usize, timeout)))
        .map_or(-5, |n| n.min(c_int::MAX as usize) as c_int)
}

/// The index of the `i`th io_u of the last getevents, its errno in `error`; -1 if none.
///
/// # Safety
/// See [`job`]; `error` is writable.
#[no_mangle]
pub unsafe extern "C" fn rnvme_fio_event(j: *mut c_void, i: u32, error: *mut c_int) -> i64 {
    // SAFETY: as promised by the caller.
    let j = unsafe { job(j) };
    match j.event(i as usize) {
        Some((index, e)) => {
            // SAFETY: `error` is writable (caller).
            unsafe { *error = e };
            index as i64
        }
        None => -1,
    }
}

/// Why io_u `index` failed, into `buf`; 0 if there is something to say.
///
/// # Safety
/// See [`job`]; `buf` has `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn rnvme_fio_errdetails(
    j: *mut c_void,
    index: u32,
    buf: *mut c_char,
    len: usize,
) -> c_int {
    // SAFETY: as promised by the caller.
    let j = unsafe { job(j) };
    match j.error_detail(index) {
        Some(d) => {
            // SAFETY: `buf` has `len` bytes (caller).
            unsafe { put(buf, len, d) };
            0
        }
        None => 1,
    }
}

/// With `rnvme_stats=1`: writes the job's account of its time into `buf` (NUL-terminated) and
/// returns 1; 0 when there is none.
///
/// # Safety
/// See [`job`]; `buf` has `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn rnvme_fio_job_report(
    j: *mut c_void,
    buf: *mut c_char,
    len: usize,
) -> c_int {
    // SAFETY: as promised by the caller.
    let j = unsafe { job(j) };
    match guarded(|| Ok(j.report())) {
        Ok(Some(line)) => {
            // SAFETY: `buf` has `len` bytes (caller).
            unsafe { put(buf, len, &line) };
            1
        }
        _ => 0,
    }
}

/// Frees a job: its queue pair is deleted (commands still in flight keep their memory, or
/// have it quarantined, as the driver's rule is).
///
/// # Safety
/// `j` came from [`rnvme_fio_job_new`] and is not used after this.
#[no_mangle]
pub unsafe extern "C" fn rnvme_fio_job_free(j: *mut c_void) {
    if j.is_null() {
        return;
    }
    // SAFETY: `j` is the Box of rnvme_fio_job_new, given up by the caller.
    let b = unsafe { Box::from_raw(j.cast::<Job>()) };
    let _ = catch_unwind(AssertUnwindSafe(|| drop(b)));
}

/// Closes every controller of the process (when fio unloads the engine).
#[no_mangle]
pub extern "C" fn rnvme_fio_exit() {
    let _ = catch_unwind(registry::close_all);
}

extern "C" {
    /// fio's `struct ioengine_ops` of the engine (`c/engine.c`).
    fn rnvme_fio_ops() -> *mut c_void;
}

/// What fio looks up in an external engine when it has no `ioengine` data symbol: the
/// engine's `struct ioengine_ops`.
///
/// # Safety
/// `ops` is writable.
#[no_mangle]
pub unsafe extern "C" fn get_ioengine(ops: *mut *mut c_void) {
    // SAFETY: `rnvme_fio_ops` returns the address of a static; `ops` is writable (caller).
    unsafe { *ops = rnvme_fio_ops() };
}
