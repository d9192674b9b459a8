//! Removal requests: giving the device back when the kernel asks for it.

use super::*;

// ---------------------------------------------------------------------------------------------
// Removal requests
// ---------------------------------------------------------------------------------------------

/// What a removal request changes, shared by the device and its removal watcher.
///
/// When the kernel wants the device back (a hot-unplug, `echo 1 > .../remove`, an unbind),
/// vfio-pci signals the device-request eventfd and then waits until every user has closed the
/// device. Releasing it means: every BAR0 mapping is swapped, atomically, for memory that reads
/// all ones (what a vanished PCI device returns, which the queue pairs and the controller already
/// treat as "device removed"), and the device file descriptor is atomically replaced with a
/// placeholder, which closes the device file. Other threads may be accessing registers at that
/// moment: they see the register or all ones, never an unmapped page.
pub(super) struct Link {
    pub(super) bdf: String,
    /// The BAR0 mappings as (address, length); the `MmioArea`s own them.
    pub(super) areas: Vec<(usize, usize)>,
    /// The device file descriptor (owned by the `VfioDevice`).
    pub(super) device_fd: RawFd,
    /// Signalled by vfio-pci when the kernel asks for the device back; None when the kernel
    /// offers no device-request interrupt (then a removal waits until rnvme closes the device).
    pub(super) request: Option<EventFd>,
    /// Set once the device has been released.
    pub(super) released: AtomicBool,
    /// Serialises a release with the device's own drop.
    pub(super) lock: Mutex<()>,
}

impl Link {
    pub(super) fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Whether the kernel has asked for the device back and the request is not yet handled.
    pub(super) fn request_pending(&self) -> bool {
        let Some(request) = &self.request else {
            return false;
        };
        let mut fds = [libc::pollfd {
            fd: request.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call; a zero
        // timeout makes it a non-blocking check.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        n == 1 && fds[0].revents & libc::POLLIN != 0
    }

    /// Let go of the device: registers read all ones from now on and the device file is closed.
    pub(super) fn release(&self, why: &str) {
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.is_released() {
            return;
        }
        self.released.store(true, Ordering::Release);
        for &(addr, len) in &self.areas {
            if let Err(e) = replace_with_ones(addr, len) {
                log::error!(
                    "{}: {why}, but BAR0 cannot be unmapped ({e}): the kernel waits until this \
                     process exits",
                    self.bdf
                );
                return;
            }
        }
        if let Err(e) = replace_fd(self.device_fd) {
            log::error!(
                "{}: {why}, but the device file cannot be closed ({e}): the kernel waits until \
                 this process exits",
                self.bdf
            );
            return;
        }
        log::warn!(
            "{}: {why}: device released; outstanding and later commands fail with \"device \
             removed\"",
            self.bdf
        );
    }
}

/// Swap the mapping `[addr, addr + len)` for private memory that reads all ones, in one step.
pub(super) fn replace_with_ones(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: a fresh private anonymous mapping chosen by the kernel (address hint null): it
    // overlaps nothing Rust uses. The result is checked before use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `p..p + len` is the mapping just made, writable, and known to no one else.
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0xff, len) };
    // SAFETY: moves the pages just filled onto `addr..addr + len`, a BAR0 mapping of exactly
    // that length owned by an `MmioArea` that outlives this call (the watcher is joined before
    // the areas are dropped). The kernel replaces the old mapping in one step, so concurrent
    // volatile accesses through the area hit either the register or the new memory; the area
    // goes on owning (and eventually unmapping) `addr..addr + len`.
    let q = unsafe {
        libc::mremap(
            p,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            addr as *mut libc::c_void,
        )
    };
    if q == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        // SAFETY: `p` is still the mapping made above (mremap failed and left it in place).
        unsafe { libc::munmap(p, len) };
        return Err(e);
    }
    Ok(())
}

/// Close the file behind descriptor `fd` by making `fd` refer to a fresh eventfd, in one step:
/// whoever owns `fd` still owns a valid descriptor and closes it as usual.
pub(super) fn replace_fd(fd: RawFd) -> io::Result<()> {
    let placeholder = EventFd::new(libc::EFD_CLOEXEC)?;
    // SAFETY: dup3 only manipulates the descriptor table: `fd` is a descriptor this process
    // owns (through the VfioDevice, which outlives the call), and `placeholder` is open.
    let r = unsafe { libc::dup3(placeholder.as_raw_fd(), fd, libc::O_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A thread that waits for the kernel's device request and then releases the device.
pub(super) struct RemovalWatcher {
    pub(super) stop: EventFd,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
}

impl RemovalWatcher {
    pub(super) fn spawn(link: Arc<Link>) -> io::Result<Option<RemovalWatcher>> {
        let Some(request) = link.request.as_ref().map(|r| r.as_raw_fd()) else {
            return Ok(None);
        };
        let stop = EventFd::new(libc::EFD_CLOEXEC)?;
        let stop_fd = stop.as_raw_fd();
        let thread = std::thread::Builder::new()
            .name(format!("rnvme-removal-{}", link.bdf))
            .spawn(move || loop {
                let mut fds = [request, stop_fd].map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
                // SAFETY: `fds` is a valid array of two pollfds for the duration of the call;
                // both descriptors stay open until this thread is joined.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    log::error!("{}: waiting for removal requests failed: {e}", link.bdf);
                    return;
                }
                if fds[1].revents != 0 {
                    return;
                }
                if fds[0].revents != 0 {
                    link.release("the kernel asks for the device back (hot-unplug or removal)");
                    return;
                }
            })?;
        Ok(Some(RemovalWatcher {
            stop,
            thread: Some(thread),
        }))
    }

    pub(super) fn stop(mut self) {
        if let Err(e) = self.stop.write(1) {
            log::error!("cannot stop the removal watcher: {e}");
            return;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Register an eventfd for vfio-pci's device requests; None (with the reason logged) when the
/// kernel offers none.
pub(super) fn register_request(bdf: &str, device: &VfioDevice) -> Option<EventFd> {
    let offered = device
        .get_irq_info(VFIO_PCI_REQ_IRQ_INDEX)
        .is_some_and(|irq| irq.count > 0);
    if !offered {
        log::info!(
            "{bdf}: vfio-pci offers no device-request interrupt: a removal of the device waits \
             until rnvme closes it"
        );
        return None;
    }
    let registered = EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)
        .map_err(|e| e.to_string())
        .and_then(|fd| {
            device
                .enable_irq(VFIO_PCI_REQ_IRQ_INDEX, vec![&fd])
                .map(|()| fd)
                .map_err(|e| e.to_string())
        });
    match registered {
        Ok(fd) => Some(fd),
        Err(e) => {
            log::warn!(
                "{bdf}: cannot register for removal requests ({e}): a removal of the device \
                 waits until rnvme closes it"
            );
            None
        }
    }
}
