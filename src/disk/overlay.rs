//! A slot's copy-on-write disk over a read-only base.
//!
//! # Format (version 1)
//! An overlay is two files side by side, `<slot>.data` and `<slot>.map`:
//!
//! - `<slot>.data` is a sparse file as large as the base. Grain `g` (4 KiB, [`GRAIN`]) of the virtual
//!   disk lives at the same offset in it, so a read of a written grain is one `pread`.
//! - `<slot>.map` starts with a 4096-byte header, all integers little-endian:
//!   `magic "CRLOVL01"`, `u32 version = 1`, `u32 grain`, `u64 size`, `u64 base size`,
//!   `u16 base name length`, the base name (UTF-8, at most 255 bytes), zeros up to 4096. After the header
//!   comes the allocation bitmap, whole 4096-byte pages: bit `g % 8` of byte `g / 8` is set when grain
//!   `g` is stored in the data file; a clear bit means "read the base". The map is written once at
//!   creation (to a temporary name, fsynced, then renamed) and afterwards only in whole bitmap pages.
//!
//! # Crash ordering
//! A write goes to the data file first and sets its grains' bits in memory afterwards. A FLUSH (and a
//! FUA write) then: takes the set of bitmap pages changed since the last flush and copies them, makes the
//! data file durable (`fdatasync`), writes the copied pages into the map and makes the map durable. So a
//! bit reaches the disk only after the data it points at; after a crash every grain is either the
//! base's (never written, or written and not flushed) or data that was written: never a hole standing in
//! for base data. Pages are copied *before* the data sync so that a bit set by a write racing the flush
//! waits for the next flush, together with its data.
//!
//! A write that covers only part of a grain the slot never wrote fills the rest of that grain from the
//! base first (copy-up), under a lock that allocating writes share; writes to grains already allocated
//! take no lock. TRIM and WRITE_ZEROES punch holes in the data file and mark the grains allocated, so the
//! range reads as zeros rather than as the base.
//!
//! While a corral process serves an overlay it holds an exclusive `flock` on the map, so `corral disk
//! reset|commit` refuse to touch a disk that a node has open.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{check_range, file_extents, push_extent, Base, Disk, DiskError, DiskResult, Extent};

pub const GRAIN: u64 = 4096;
const HEADER: u64 = 4096;
const MAGIC: &[u8; 8] = b"CRLOVL01";
const VERSION: u32 = 1;
/// The bitmap is persisted in pages of this many bytes (32,768 grains, 128 MiB of disk each).
const PAGE: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE / 8;

/// What the map's header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub grain: u32,
    pub size: u64,
    pub base_size: u64,
    pub base_name: String,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut h = vec![0u8; HEADER as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.grain.to_le_bytes());
        h[16..24].copy_from_slice(&self.size.to_le_bytes());
        h[24..32].copy_from_slice(&self.base_size.to_le_bytes());
        let name = self.base_name.as_bytes();
        let n = name.len().min(255);
        h[32..34].copy_from_slice(&(n as u16).to_le_bytes());
        h[34..34 + n].copy_from_slice(&name[..n]);
        h
    }

    pub fn decode(h: &[u8]) -> Result<Header, String> {
        if h.len() < HEADER as usize || &h[0..8] != MAGIC {
            return Err("not a corral overlay map (bad magic)".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap_or_default());
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or_default());
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!("overlay version {version} is not supported"));
        }
        let grain = u32_at(12);
        if grain as u64 != GRAIN {
            return Err(format!("overlay grain {grain} is not supported"));
        }
        let n = u16::from_le_bytes([h[32], h[33]]) as usize;
        if n > 255 {
            return Err("overlay header: base name too long".into());
        }
        let base_name = String::from_utf8(h[34..34 + n].to_vec())
            .map_err(|_| "overlay header: base name is not UTF-8".to_string())?;
        Ok(Header {
            grain,
            size: u64_at(16),
            base_size: u64_at(24),
            base_name,
        })
    }
}

/// Bytes of bitmap (whole pages) for a disk of `size` bytes.
fn bitmap_bytes(size: u64) -> u64 {
    let grains = size.div_ceil(GRAIN);
    grains.div_ceil(PAGE as u64 * 8) * PAGE as u64
}

/// The two files of an overlay named by `stem` (`<dir>/<slot>`).
pub fn paths(stem: &Path) -> (PathBuf, PathBuf) {
    (stem.with_extension("data"), stem.with_extension("map"))
}

pub struct Overlay {
    base: Arc<Base>,
    data: File,
    map: File,
    size: u64,
    grains: u64,
    bits: Vec<AtomicU64>,
    /// Bitmap pages changed since the last flush.
    dirty: Vec<AtomicBool>,
    /// Held by writes that allocate grains (copy-up and bit setting), never by writes to allocated ones.
    alloc: Mutex<()>,
    /// One flush at a time, so pages are written in the order they were copied.
    flushing: Mutex<()>,
    stem: PathBuf,
    /// Set by [`Overlay::abandon`]: close as a crash would, without the final flush.
    abandoned: AtomicBool,
}

impl Overlay {
    /// Creates an empty overlay for `base` at `stem` unless one exists. Returns whether it created one.
    pub fn create(stem: &Path, base: &Base) -> io::Result<bool> {
        let (data_path, map_path) = paths(stem);
        if map_path.exists() {
            return Ok(false);
        }
        if let Some(dir) = stem.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let size = base.size();
        // The data file first: a map never points at a data file that does not exist.
        let data = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&data_path)?;
        data.set_len(size)?;
        data.sync_all()?;
        let tmp = map_path.with_extension("map.tmp");
        let map = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&tmp)?;
        let header = Header {
            grain: GRAIN as u32,
            size,
            base_size: size,
            base_name: base.name.clone(),
        };
        map.write_all_at(&header.encode(), 0)?;
        map.set_len(HEADER + bitmap_bytes(size))?;
        map.sync_all()?;
        std::fs::rename(&tmp, &map_path)?;
        if let Some(dir) = stem.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(true)
    }

    /// Reads an overlay's header and persisted bitmap without opening it for service (for `corral disk`).
    pub fn inspect(stem: &Path) -> io::Result<(Header, u64)> {
        let (_, map_path) = paths(stem);
        let bytes = std::fs::read(&map_path)?;
        let header = Header::decode(&bytes).map_err(io::Error::other)?;
        let grains = header.size.div_ceil(GRAIN);
        let bitmap = &bytes[HEADER as usize..];
        let mut set = 0u64;
        for (i, b) in bitmap.iter().enumerate() {
            let valid = (grains.saturating_sub(i as u64 * 8)).min(8) as u32;
            let mask = if valid >= 8 {
                0xff
            } else {
                (1u16 << valid) as u8 - 1
            };
            set += (b & mask).count_ones() as u64;
        }
        Ok((header, set))
    }

    /// Opens an overlay for service, checking it belongs to `base`, and takes its lock.
    pub fn open(stem: &Path, base: Arc<Base>) -> io::Result<Overlay> {
        let (data_path, map_path) = paths(stem);
        let map = OpenOptions::new().read(true).write(true).open(&map_path)?;
        lock(&map, stem)?;
        let mut head = vec![0u8; HEADER as usize];
        map.read_exact_at(&mut head, 0)?;
        let header = Header::decode(&head)
            .map_err(|e| io::Error::other(format!("{}: {e}", map_path.display())))?;
        if header.base_name != base.name || header.size != base.size() {
            return Err(io::Error::other(format!(
                "{}: made for base `{}` of {} bytes, but `{}` is {} bytes",
                map_path.display(),
                header.base_name,
                header.size,
                base.name,
                base.size()
            )));
        }
        let data = OpenOptions::new().read(true).write(true).open(&data_path)?;
        if data.metadata()?.len() != header.size {
            data.set_len(header.size)?;
        }
        let size = header.size;
        let grains = size.div_ceil(GRAIN);
        let pages = bitmap_bytes(size) as usize / PAGE;
        let mut raw = vec![0u8; pages * PAGE];
        map.read_exact_at(&mut raw, HEADER)?;
        let bits = raw
            .chunks_exact(8)
            .map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().unwrap_or_default())))
            .collect();
        Ok(Overlay {
            base,
            data,
            map,
            size,
            grains,
            bits,
            dirty: (0..pages).map(|_| AtomicBool::new(false)).collect(),
            alloc: Mutex::new(()),
            flushing: Mutex::new(()),
            stem: stem.to_path_buf(),
            abandoned: AtomicBool::new(false),
        })
    }

    /// Closes the overlay the way a killed process would: whatever was not flushed is not made durable.
    /// For crash tests.
    pub fn abandon(self) {
        self.abandoned.store(true, Ordering::Relaxed);
    }

    pub fn stem(&self) -> &Path {
        &self.stem
    }

    pub fn base(&self) -> &Arc<Base> {
        &self.base
    }

    fn allocated(&self, g: u64) -> bool {
        self.bits[(g / 64) as usize].load(Ordering::Acquire) & (1 << (g % 64)) != 0
    }

    fn set(&self, g: u64) {
        let w = (g / 64) as usize;
        let mask = 1u64 << (g % 64);
        if self.bits[w].fetch_or(mask, Ordering::AcqRel) & mask == 0 {
            self.dirty[w / WORDS_PER_PAGE].store(true, Ordering::Release);
        }
    }

    /// Grains stored in the data file (as of now, flushed or not).
    pub fn allocated_grains(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    /// Copies `from..to` of the base into the data file (the part of a grain a write does not cover).
    fn fill_from_base(&self, from: u64, to: u64) -> io::Result<()> {
        if from >= to {
            return Ok(());
        }
        let mut buf = vec![0u8; (to - from) as usize];
        self.base.read_at(from, &mut buf)?;
        self.data.write_all_at(&buf, from)
    }

    /// Writes zeros over `from..to`, by punching a hole where the file system can.
    fn zero_data(&self, from: u64, to: u64) -> io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if fallocate(&self.data, flags, from as i64, (to - from) as i64).is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; 1 << 20];
        let mut pos = from;
        while pos < to {
            let n = (to - pos).min(zeros.len() as u64) as usize;
            self.data.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn grain_end(&self, g: u64) -> u64 {
        ((g + 1) * GRAIN).min(self.size)
    }

    /// `offset..end` cut into runs of grains stored alike: (start, end, stored in the data file).
    fn runs(&self, offset: u64, end: u64) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let stored = self.allocated(pos / GRAIN);
            let mut run_end = self.grain_end(pos / GRAIN).min(end);
            while run_end < end && self.allocated(run_end / GRAIN) == stored {
                run_end = self.grain_end(run_end / GRAIN).min(end);
            }
            let run = (pos, run_end, stored);
            pos = run_end;
            Some(run)
        })
    }
}

fn lock(map: &File, stem: &Path) -> io::Result<()> {
    // SAFETY: flock on a descriptor this function borrows; no memory is touched.
    let r = unsafe { libc::flock(map.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Err(io::Error::other(format!(
                "{} is in use (a running corral serves it)",
                stem.display()
            )));
        }
        return Err(e);
    }
    Ok(())
}

/// Takes an overlay's lock for an offline operation (reset, commit, export); released when the file
/// closes.
pub fn lock_offline(stem: &Path) -> io::Result<File> {
    let (_, map_path) = paths(stem);
    let f = OpenOptions::new().read(true).write(true).open(map_path)?;
    lock(&f, stem)?;
    Ok(f)
}

impl Disk for Overlay {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> DiskResult<()> {
        let len = buf.len() as u64;
        check_range(self.size, offset, len)?;
        // Runs of grains from the same file become one pread each.
        for (pos, run_end, stored) in self.runs(offset, offset + len) {
            let slice = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            if stored {
                self.data.read_exact_at(slice, pos)?;
            } else {
                self.base.read_at(pos, slice)?;
            }
        }
        Ok(())
    }

    fn pieces(&self, offset: u64, len: u64) -> Option<Vec<super::Piece<'_>>> {
        check_range(self.size, offset, len).ok()?;
        // The same runs as `read`: grains stored here come from the data file, the rest from the base.
        Some(
            self.runs(offset, offset + len)
                .map(|(pos, run_end, stored)| super::Piece {
                    file: if stored { &self.data } else { self.base.file() },
                    offset: pos,
                    len: run_end - pos,
                })
                .collect(),
        )
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> DiskResult<()> {
        let len = data.len() as u64;
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let (g0, g1) = (offset / GRAIN, (end - 1) / GRAIN);
        if (g0..=g1).all(|g| self.allocated(g)) {
            self.data.write_all_at(data, offset)?;
        } else {
            let _alloc = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
            // Re-checked under the lock: another write may have allocated these grains meanwhile.
            if offset % GRAIN != 0 && !self.allocated(g0) {
                self.fill_from_base(g0 * GRAIN, offset)?;
            }
            if end < self.grain_end(g1) && !self.allocated(g1) {
                self.fill_from_base(end, self.grain_end(g1))?;
            }
            self.data.write_all_at(data, offset)?;
            for g in g0..=g1 {
                self.set(g);
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> DiskResult<()> {
        let _one = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let mut pages = Vec::new();
        for (p, d) in self.dirty.iter().enumerate() {
            if d.swap(false, Ordering::AcqRel) {
                let mut bytes = Vec::with_capacity(PAGE);
                for w in &self.bits[p * WORDS_PER_PAGE..(p + 1) * WORDS_PER_PAGE] {
                    bytes.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
                }
                pages.push((p, bytes));
            }
        }
        let result = (|| {
            self.data.sync_data()?;
            for (p, bytes) in &pages {
                self.map.write_all_at(bytes, HEADER + (*p * PAGE) as u64)?;
            }
            if !pages.is_empty() {
                self.map.sync_data()?;
            }
            Ok::<(), io::Error>(())
        })();
        if let Err(e) = result {
            // Not durable: those pages must be written by the next flush.
            for (p, _) in &pages {
                self.dirty[*p].store(true, Ordering::Release);
            }
            return Err(e.into());
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> DiskResult<()> {
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        // Whole grains inside the range get a hole; the partial grains at either edge are written.
        let a = offset.div_ceil(GRAIN) * GRAIN;
        let b = if end == self.size {
            end
        } else {
            end / GRAIN * GRAIN
        };
        if a >= b {
            self.write(offset, &vec![0u8; len as usize], false)?;
        } else {
            if offset < a {
                self.write(offset, &vec![0u8; (a - offset) as usize], false)?;
            }
            if b < end {
                self.write(b, &vec![0u8; (end - b) as usize], false)?;
            }
            let _alloc = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
            self.zero_data(a, b)?;
            for g in a / GRAIN..b.div_ceil(GRAIN) {
                self.set(g);
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> DiskResult<Vec<Extent>> {
        check_range(self.size, offset, len)?;
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < 4096 {
            let g = pos / GRAIN;
            if g >= self.grains {
                break;
            }
            let stored = self.allocated(g);
            let mut run_end = self.grain_end(g).min(end);
            while run_end < end && self.allocated(run_end / GRAIN) == stored {
                run_end = self.grain_end(run_end / GRAIN).min(end);
            }
            // Written grains: data, or a hole where the slot trimmed. Others: whatever the base has.
            let file = if stored { &self.data } else { self.base.file() };
            for e in file_extents(file, self.size, pos, run_end - pos)? {
                push_extent(&mut out, e);
            }
            pos = run_end;
        }
        if out.is_empty() {
            return Err(DiskError::Range);
        }
        Ok(out)
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if self.abandoned.load(Ordering::Relaxed) {
            return;
        }
        // A clean close leaves nothing to redo: the last writes become durable with their bits.
        if let Err(e) = self.flush() {
            tracing::error!(overlay = %self.stem.display(), error = %e, "flush on close failed");
        }
    }
}

/// Copies the disk that `stem`'s overlay presents (base plus written grains) into `out` as a raw file,
/// calling `progress(done, total)` as it goes. Unwritten zero runs stay sparse.
pub fn materialize(
    stem: &Path,
    base: Arc<Base>,
    out: &Path,
    mode: u32,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<()> {
    let overlay = Overlay::open(stem, base).map_err(|e| io::Error::other(e.to_string()))?;
    let f = create_new(out, mode)?;
    let size = overlay.size();
    f.set_len(size)?;
    let chunk = 4 << 20;
    let mut buf = vec![0u8; chunk];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(chunk as u64) as usize;
        overlay
            .read(pos, &mut buf[..n])
            .map_err(|e| io::Error::other(e.to_string()))?;
        if buf[..n].iter().any(|&b| b != 0) {
            f.write_all_at(&buf[..n], pos)?;
        }
        pos += n as u64;
        progress(pos, size);
    }
    f.sync_all()?;
    Ok(())
}

/// Creates `path` for writing, only if nothing is there: `O_CREAT|O_EXCL|O_NOFOLLOW` with `mode` (before the
/// umask), so a symlink planted at the path (dangling or not) is refused instead of followed, and a disk's
/// bytes never land in a file someone else made or can read. A leftover from an interrupted run is refused
/// too, with a message saying so; the operator removes it.
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{} already exists (a leftover of an interrupted run, or a symlink); not writing through it, remove it first",
                        path.display()
                    ),
                )
            } else {
                io::Error::new(e.kind(), format!("{}: {e}", path.display()))
            }
        })
}

#[cfg(test)]
mod tests;
