//! The disk room: block devices that the network targets (NBD, later iSCSI) serve.
//!
//! - [`Base`]: a read-only raw image in the disks directory, shared by every slot of the clusters that
//!   name it (`disk = "name"` in the policy → `<disks_dir>/<name>.img`).
//! - [`Overlay`]: one slot's writable disk. Reads fall through to the base wherever the slot never wrote;
//!   writes land in the slot's own sparse file. The format and its crash ordering are described in
//!   [`overlay`].
//!
//! Both implement [`Disk`], the block interface the protocol shells call. Every method is plain blocking
//! file I/O (`pread`/`pwrite`/`fdatasync`) that is safe to call from many threads at once: each NBD
//! connection runs on its own thread, and several connections may share one disk.

pub mod base;
pub mod overlay;
pub mod slots;

use std::io;
use std::os::fd::AsFd;

pub use base::Base;
pub use overlay::Overlay;
pub use slots::{DiskSet, SlotDisk};

/// One run of a disk's allocation map (NBD `base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Not backed by stored data.
    pub hole: bool,
    /// Reads as zeros.
    pub zero: bool,
}

/// Why a block request failed, mapped to protocol errors by the shells.
#[derive(Debug)]
pub enum DiskError {
    /// Outside the disk.
    Range,
    /// Writing to a read-only disk.
    ReadOnly,
    Io(io::Error),
}

impl From<io::Error> for DiskError {
    fn from(e: io::Error) -> Self {
        DiskError::Io(e)
    }
}

impl std::fmt::Display for DiskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskError::Range => write!(f, "request outside the disk"),
            DiskError::ReadOnly => write!(f, "disk is read-only"),
            DiskError::Io(e) => write!(f, "{e}"),
        }
    }
}

pub type DiskResult<T> = Result<T, DiskError>;

/// A block device. Offsets and lengths are in bytes; callers check ranges with [`check_range`] first,
/// implementations check again (a bad request must never touch a file).
pub trait Disk: Send + Sync {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    fn read(&self, offset: u64, buf: &mut [u8]) -> DiskResult<()>;
    /// Writes; with `fua` the data is durable before this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> DiskResult<()>;
    /// Makes every write that completed before this call durable.
    fn flush(&self) -> DiskResult<()>;
    /// Discards a range: afterwards it reads as zeros (corral guarantees it, so TRIM is WRITE_ZEROES).
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> DiskResult<()>;
    /// Allocation runs from `offset`, covering at least one byte and at most `len`.
    fn extents(&self, offset: u64, len: u64) -> DiskResult<Vec<Extent>>;
    /// Where the bytes of `offset..offset+len` are stored, in order, as (file, offset in it, length):
    /// lets a shell send them with `sendfile` instead of copying them through a buffer. `None` when the
    /// disk cannot say or the range is bad (the caller then uses [`Disk::read`]).
    fn pieces(&self, offset: u64, len: u64) -> Option<Vec<Piece<'_>>> {
        let _ = (offset, len);
        None
    }
    /// Whether a flush on one connection covers writes completed on any other (true for every disk
    /// here: all connections to one disk share its files and its allocation map).
    fn shared_flush(&self) -> bool {
        true
    }
}

/// A stretch of a disk's bytes as stored in one file (see [`Disk::pieces`]).
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    pub file: &'a std::fs::File,
    pub offset: u64,
    pub len: u64,
}

/// `offset..offset+len` lies inside a disk of `size` bytes (no overflow).
pub fn check_range(size: u64, offset: u64, len: u64) -> DiskResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::Range),
    }
}

/// Allocation runs of a plain file, from SEEK_DATA/SEEK_HOLE; a file system without them reports data.
pub(crate) fn file_extents(
    file: &std::fs::File,
    size: u64,
    offset: u64,
    len: u64,
) -> io::Result<Vec<Extent>> {
    use nix::unistd::{lseek, Whence};
    let end = offset.saturating_add(len).min(size);
    let mut out = Vec::new();
    let mut pos = offset;
    let fd = file.as_fd();
    while pos < end && out.len() < 1024 {
        let data = match lseek(fd, pos as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            // ENXIO: no data after pos.
            Err(nix::errno::Errno::ENXIO) => end,
            Err(_) => {
                out.push(Extent {
                    len: end - pos,
                    hole: false,
                    zero: false,
                });
                break;
            }
        };
        if data > pos {
            let l = data.min(end) - pos;
            out.push(Extent {
                len: l,
                hole: true,
                zero: true,
            });
            pos += l;
            continue;
        }
        let hole = match lseek(fd, pos as i64, Whence::SeekHole) {
            Ok(h) => (h as u64).max(pos + 1),
            Err(_) => end,
        };
        let l = hole.min(end) - pos;
        out.push(Extent {
            len: l,
            hole: false,
            zero: false,
        });
        pos += l;
    }
    Ok(out)
}

/// Appends a run, merging it into the previous one when their flags agree.
pub(crate) fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.hole == e.hole && last.zero == e.zero => last.len += e.len,
        _ => out.push(e),
    }
}
