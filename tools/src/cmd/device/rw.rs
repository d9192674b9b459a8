//! `rnvme read` and `rnvme write`: LBAs to standard output or a file, and from standard input or
//! a file, streamed a piece of the max transfer at a time.

use super::*;

/// `rnvme read`
#[derive(Args, Debug)]
pub struct ReadArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    #[command(flatten)]
    pub range: RangeArgs,
    /// Bytes to read, a multiple of the LBA size (nvme-cli's data size; instead of a count)
    #[arg(short = 'z', long = "data-size", value_name = "BYTES")]
    pub data_size: Option<u64>,
    /// Write the data to this file instead of standard output
    #[arg(short = 'd', long, visible_alias = "data")]
    pub out: Option<PathBuf>,
    /// Write the metadata to this file (namespaces that keep it in a separate buffer; on an
    /// extended-LBA format it is part of each block of the data)
    #[arg(long)]
    pub metadata: Option<PathBuf>,
}

pub fn read(a: ReadArgs) -> Result<ExitCode> {
    let wanted = a.range.count()?;
    let (Some(lba), true) = (a.range.lba, wanted.is_some() || a.data_size.is_some()) else {
        return Err(UsageError(
            "read needs --lba and --count (or nvme-cli's -s, and -c or -z)".into(),
        )
        .into());
    };
    let ctrl = a.dev.open()?;
    let ns = namespace(&ctrl, a.range.nsid)?;
    let per_lba = ns
        .layout()
        .map_or(u64::from(ns.lba_size), |l| u64::from(l.data_per_lba));
    let count = resolve_count(wanted, a.data_size, per_lba)?.unwrap_or(0);
    check_range(&ns, lba, count)?;
    let mut out: Box<dyn Write> = match &a.out {
        Some(p) => {
            Box::new(File::create(p).with_context(|| format!("cannot create {}", p.display()))?)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let write_error = |e: std::io::Error| match &a.out {
        Some(p) => anyhow::Error::new(e).context(format!("cannot write {}", p.display())),
        None => crate::cmd::stdout_error(e),
    };
    let mut qp = qpair(&ctrl)?;
    let layout = qp.layout(ns.nsid)?;
    let mut meta_out = metadata_file(&ns, layout.metadata_per_lba, a.metadata.as_deref(), true)?;
    let lba_size = layout.data_per_lba as u64;
    let ms = layout.metadata_per_lba as u64;
    let per_step = (STEP / lba_size).max(1);
    let buf = ctrl.alloc((per_step * lba_size) as usize)?;
    let meta = match ms {
        0 => None,
        _ => Some(ctrl.alloc((per_step * ms) as usize)?),
    };
    let mut host = vec![0u8; buf.len()];
    let mut done = 0;
    while done < count {
        let n = per_step.min(count - done);
        match &meta {
            Some(m) => qp.read_with_metadata(ns.nsid, lba + done, n, &buf, m)?,
            None => qp.read(ns.nsid, lba + done, n, &buf)?,
        }
        let bytes = (n * lba_size) as usize;
        buf.read_bytes(0, &mut host[..bytes]);
        out.write_all(&host[..bytes]).map_err(write_error)?;
        if let (Some(m), Some((f, path))) = (&meta, meta_out.as_mut()) {
            let mut mhost = vec![0u8; (n * ms) as usize];
            m.read_bytes(0, &mut mhost);
            f.write_all(&mhost)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        done += n;
    }
    out.flush().map_err(write_error)?;
    Ok(ExitCode::SUCCESS)
}

/// `rnvme write`
#[derive(Args, Debug)]
#[command(after_help = "\
The input is written as it is read, one piece of the controller's largest transfer at a time. \
Its length must be a positive multiple of the LBA size and fit in the namespace: a file (--in) \
is checked before anything is written. Standard input cannot be: when it turns out not to be a \
multiple of the LBA size, its last piece is not written; when it reaches past the end of the \
namespace, it is written up to the end. Either way the pieces before are on the device, and the \
error says which LBAs were written (exit status 2).")]
pub struct WriteArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Namespace id
    #[arg(
        short = 'n',
        long = "ns",
        visible_alias = "namespace-id",
        default_value_t = 1
    )]
    pub nsid: u32,
    /// First LBA
    #[arg(short = 's', long, visible_alias = "start-block")]
    pub lba: Option<u64>,
    /// Number of LBAs less one, as nvme-cli counts: the input must hold that many LBAs, and
    /// only they are written
    #[arg(short = 'c', long = "block-count", value_name = "N")]
    pub block_count: Option<u64>,
    /// Bytes to write, a multiple of the LBA size (nvme-cli's data size): the input must hold
    /// that many, and only they are written
    #[arg(short = 'z', long = "data-size", value_name = "BYTES")]
    pub data_size: Option<u64>,
    /// Read the data from this file instead of standard input
    #[arg(short = 'd', long = "in", visible_alias = "data")]
    pub input: Option<PathBuf>,
    /// Force Unit Access: the data is on stable media when each write completes
    #[arg(long)]
    pub fua: bool,
    /// Read the metadata from this file (namespaces that keep it in a separate buffer: it
    /// must hold the metadata of every LBA written; on an extended-LBA format it is part of
    /// each block of the data)
    #[arg(long)]
    pub metadata: Option<PathBuf>,
}

/// The `--metadata` file of `read` (`create`) or `write`, checked against the namespace: one
/// is needed exactly when the namespace keeps `ms` bytes of metadata per LBA in a separate
/// buffer.
pub(super) fn metadata_file(
    ns: &NamespaceInfo,
    ms: u32,
    path: Option<&Path>,
    create: bool,
) -> Result<Option<(File, PathBuf)>> {
    match (ms, path) {
        (0, None) => Ok(None),
        (0, Some(_)) => Err(UsageError(format!(
            "namespace {} keeps no metadata in a separate buffer ({} bytes per LBA{}): drop \
             --metadata",
            ns.nsid,
            ns.metadata_size,
            if ns.metadata_size > 0 {
                ", moved with the data or inserted by the controller"
            } else {
                ""
            }
        ))
        .into()),
        (_, None) => Err(UsageError(format!(
            "namespace {} keeps {ms} bytes of metadata per LBA in a separate buffer: give \
             --metadata FILE",
            ns.nsid
        ))
        .into()),
        (_, Some(p)) => {
            let f = if create {
                File::create(p)
            } else {
                File::open(p)
            }
            .with_context(|| format!("cannot open {}", p.display()))?;
            Ok(Some((f, p.to_path_buf())))
        }
    }
}

/// The input of `rnvme write`.
pub(super) struct Input {
    pub(super) reader: Box<dyn Read>,
    /// What to call it in an error.
    pub(super) name: String,
    /// Its length, when it is known before reading (a regular file).
    pub(super) len: Option<u64>,
}

impl Input {
    pub(super) fn open(path: Option<&Path>) -> Result<Input> {
        let Some(p) = path else {
            return Ok(Input {
                reader: Box::new(std::io::stdin().lock()),
                name: "standard input".into(),
                len: None,
            });
        };
        let f = File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
        let meta = f
            .metadata()
            .with_context(|| format!("cannot read {}", p.display()))?;
        // A pipe or a device has no length up front: it is read like standard input.
        let len = meta.is_file().then_some(meta.len());
        Ok(Input {
            // Never more than was checked, should the file grow meanwhile.
            reader: Box::new(f.take(len.unwrap_or(u64::MAX))),
            name: p.display().to_string(),
            len,
        })
    }
}

impl Input {
    /// Reads no more than `bytes`; a file must hold that many (checked before anything is
    /// written).
    pub(super) fn limit(&mut self, bytes: u64) -> Result<()> {
        if let Some(len) = self.len {
            if len < bytes {
                return Err(UsageError(format!(
                    "{} holds {len} bytes, fewer than the {bytes} asked for; nothing was written",
                    self.name
                ))
                .into());
            }
            self.len = Some(bytes);
        }
        let reader = std::mem::replace(&mut self.reader, Box::new(std::io::empty()));
        self.reader = Box::new(reader.take(bytes));
        Ok(())
    }
}

/// Read until `buf` is full or the input ends; the number of bytes read.
pub(super) fn fill(input: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What a streamed write left on the device when it stopped: `done` LBAs from `start`.
pub(super) fn written(start: u64, done: u64) -> String {
    if done == 0 {
        "nothing was written".into()
    } else {
        format!(
            "its first {done} LBAs were written (LBAs {start}..{}), the rest was not",
            start + done
        )
    }
}

/// Writes `input` at LBA `start` of `ns`, one piece at a time: each piece is read into `piece`
/// (a whole number of LBAs; filled unless the input ends) and handed to `write` with its first
/// LBA. A last piece that is not a multiple of the LBA size is not written; a piece that reaches
/// past the end of the namespace is written up to the end. Both end the stream with a usage
/// error that says which LBAs were written. Returns the number of LBAs written.
pub(super) fn write_stream(
    input: &mut Input,
    (ns, lba_size): (&NamespaceInfo, u64),
    start: u64,
    piece: &mut [u8],
    write: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<u64> {
    debug_assert!(!piece.is_empty() && (piece.len() as u64).is_multiple_of(lba_size));
    let mut done = 0u64;
    loop {
        let n = fill(&mut input.reader, piece).with_context(|| {
            if done == 0 {
                format!("cannot read {}", input.name)
            } else {
                format!("cannot read {}; {}", input.name, written(start, done))
            }
        })?;
        if n == 0 {
            break;
        }
        let bytes = n as u64;
        if !bytes.is_multiple_of(lba_size) {
            return Err(UsageError(format!(
                "the input is {} bytes, not a positive multiple of the namespace's {lba_size}-byte LBA size; {}",
                done * lba_size + bytes,
                written(start, done)
            ))
            .into());
        }
        let at = start + done;
        let lbas = bytes / lba_size;
        let room = ns.size_lbas.saturating_sub(at);
        let now = lbas.min(room);
        if now > 0 {
            write(at, &piece[..(now * lba_size) as usize]).with_context(|| {
                if done == 0 {
                    format!("write LBAs {at}..{}", at + now)
                } else {
                    format!(
                        "write LBAs {at}..{} (LBAs {start}..{at} are written)",
                        at + now
                    )
                }
            })?;
            done += now;
        }
        if lbas > room {
            return Err(UsageError(format!(
                "the input goes beyond namespace {}, which has {} LBAs (0..{}); {}",
                ns.nsid,
                ns.size_lbas,
                ns.size_lbas,
                written(start, done)
            ))
            .into());
        }
        if n < piece.len() {
            break;
        }
    }
    if done == 0 {
        return Err(UsageError(format!(
            "the input is 0 bytes, not a positive multiple of the namespace's {lba_size}-byte LBA size; nothing was written"
        ))
        .into());
    }
    Ok(done)
}

pub fn write(a: WriteArgs) -> Result<ExitCode> {
    let Some(start) = a.lba else {
        return Err(UsageError("write needs --lba (or nvme-cli's -s)".into()).into());
    };
    let mut input = Input::open(a.input.as_deref())?;
    let ctrl = a.dev.open()?;
    let ns = namespace(&ctrl, a.nsid)?;
    let mut qp = qpair(&ctrl)?;
    let layout = qp.layout(ns.nsid)?;
    let lba_size = layout.data_per_lba as u64;
    let ms = layout.metadata_per_lba as u64;
    let counted = RangeArgs {
        nsid: a.nsid,
        lba: a.lba,
        count: None,
        block_count: a.block_count,
    }
    .count()?;
    let expected = resolve_count(counted, a.data_size, lba_size)?;
    if let Some(n) = expected {
        // Within the namespace first: then its bytes fit in 64 bits.
        check_range(&ns, start, n)?;
        input.limit(n * lba_size)?;
    }
    let mut meta_in = metadata_file(&ns, layout.metadata_per_lba, a.metadata.as_deref(), false)?;
    if let (Some((f, p)), Some(len)) = (meta_in.as_ref(), input.len) {
        let have = f
            .metadata()
            .with_context(|| format!("cannot read {}", p.display()))?
            .len();
        let want = len / lba_size * ms;
        if have < want {
            return Err(UsageError(format!(
                "{} holds {have} bytes of metadata; the {} LBAs of the input need {want}; \
                 nothing was written",
                p.display(),
                len / lba_size
            ))
            .into());
        }
    }
    match input.len {
        // A length known up front is checked before anything is written.
        Some(len) => {
            if len == 0 || !len.is_multiple_of(lba_size) {
                return Err(UsageError(format!(
                    "the input is {len} bytes, not a positive multiple of the namespace's {lba_size}-byte LBA size; nothing was written"
                ))
                .into());
            }
            check_range(&ns, start, len / lba_size)?;
        }
        None => check_range(&ns, start, 1)?,
    }
    // One DMA buffer of the largest transfer: one command per piece.
    let per_piece = (qp.max_transfer_for(layout.data_per_lba) as u64 / lba_size).max(1);
    let piece_bytes = per_piece * lba_size;
    let piece_bytes = input.len.map_or(piece_bytes, |len| len.min(piece_bytes)) as usize;
    let buf = ctrl.alloc(piece_bytes)?;
    let meta = match ms {
        0 => None,
        _ => Some(ctrl.alloc((piece_bytes as u64 / lba_size * ms) as usize)?),
    };
    let mut host = vec![0u8; piece_bytes];
    let count = write_stream(
        &mut input,
        (&ns, lba_size),
        start,
        &mut host,
        &mut |at, data| {
            let lbas = data.len() as u64 / lba_size;
            buf.write_bytes(0, data);
            match (&meta, meta_in.as_mut()) {
                (Some(m), Some((f, p))) => {
                    let mut mhost = vec![0u8; (lbas * ms) as usize];
                    f.read_exact(&mut mhost).with_context(|| {
                        format!(
                            "{} ends before the metadata of LBA {}",
                            p.display(),
                            at + lbas - 1
                        )
                    })?;
                    m.write_bytes(0, &mhost);
                    qp.write_with_metadata(ns.nsid, at, lbas, (&buf, m), a.fua)?;
                }
                _ => qp.write(ns.nsid, at, lbas, &buf, a.fua)?,
            }
            Ok(())
        },
    )?;
    if let Some(n) = expected.filter(|&n| count < n) {
        return Err(UsageError(format!(
            "{} ended after {count} of the {n} LBAs asked for; {}",
            input.name,
            written(start, count)
        ))
        .into());
    }
    eprintln!(
        "wrote {count} LBAs ({} bytes) at LBA {start} of namespace {}",
        count * lba_size,
        ns.nsid
    );
    Ok(ExitCode::SUCCESS)
}
