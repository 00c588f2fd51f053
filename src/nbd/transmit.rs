//! Transmission: a request header becomes a checked [`Command`] or the protocol's error, and a command
//! run against a [`Disk`] becomes reply bytes (simple or structured, as negotiated). The shell only
//! moves bytes; every decision about a request is made here.

use super::handshake::Export;
use super::proto::*;
use crate::disk::{Disk, DiskError, Extent};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Zero {
        offset: u64,
        len: u32,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        one: bool,
    },
    /// A hint that changes nothing (NBD_CMD_CACHE): acknowledged.
    Cache,
    Disconnect,
}

/// A request that cannot be carried out: its errno and why (for the structured error message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub errno: u32,
    pub why: &'static str,
}

fn refuse(errno: u32, why: &'static str) -> Refused {
    Refused { errno, why }
}

/// Checks a request against the export: command known and allowed, flags valid, range inside the disk.
pub fn check(req: &Request, ex: &Export) -> Result<Command, Refused> {
    let size = ex.disk.size();
    let in_range = || {
        req.offset
            .checked_add(req.len as u64)
            .is_some_and(|end| end <= size)
    };
    let known =
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
    if req.flags & !known != 0 {
        return Err(refuse(EINVAL, "unknown command flags"));
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let writable = || {
        if ex.disk.read_only() {
            Err(refuse(EPERM, "export is read-only"))
        } else {
            Ok(())
        }
    };
    match req.kind {
        CMD_READ => {
            if req.flags & CMD_FLAG_DF != 0 && !ex.structured {
                return Err(refuse(EINVAL, "DF needs structured replies"));
            }
            if req.len > MAX_PAYLOAD {
                return Err(refuse(EOVERFLOW, "read larger than 32 MiB"));
            }
            if !in_range() {
                return Err(refuse(EINVAL, "read beyond the end of the disk"));
            }
            Ok(Command::Read {
                offset: req.offset,
                len: req.len,
            })
        }
        CMD_WRITE => {
            writable()?;
            if !in_range() {
                return Err(refuse(ENOSPC, "write beyond the end of the disk"));
            }
            Ok(Command::Write {
                offset: req.offset,
                len: req.len,
                fua,
            })
        }
        CMD_FLUSH => Ok(Command::Flush),
        CMD_TRIM | CMD_WRITE_ZEROES => {
            writable()?;
            if req.kind == CMD_WRITE_ZEROES && req.flags & CMD_FLAG_FAST_ZERO != 0 {
                // Not advertised: zeroing may write the partial grains at the edges.
                return Err(refuse(ENOTSUP, "fast zero is not offered"));
            }
            if !in_range() {
                return Err(refuse(ENOSPC, "range beyond the end of the disk"));
            }
            Ok(Command::Zero {
                offset: req.offset,
                len: req.len,
                fua,
            })
        }
        CMD_BLOCK_STATUS => {
            if !ex.base_allocation {
                return Err(refuse(EINVAL, "no metadata context was negotiated"));
            }
            if req.len == 0 || !in_range() {
                return Err(refuse(EINVAL, "block status range invalid"));
            }
            Ok(Command::BlockStatus {
                offset: req.offset,
                len: req.len,
                one: req.flags & CMD_FLAG_REQ_ONE != 0,
            })
        }
        CMD_CACHE => {
            if !in_range() {
                return Err(refuse(EINVAL, "cache beyond the end of the disk"));
            }
            Ok(Command::Cache)
        }
        CMD_DISC => Ok(Command::Disconnect),
        _ => Err(refuse(EINVAL, "unknown command")),
    }
}

fn disk_errno(e: &DiskError) -> u32 {
    match e {
        DiskError::Range => EINVAL,
        DiskError::ReadOnly => EPERM,
        DiskError::Io(io) if io.raw_os_error() == Some(28) => ENOSPC,
        DiskError::Io(_) => EIO,
    }
}

/// Appends the reply for a refused or failed request.
pub fn error_reply(out: &mut Vec<u8>, ex: &Export, cookie: u64, errno: u32, why: &str) {
    if ex.structured {
        chunk_error(out, cookie, errno, why);
    } else {
        simple_reply(out, errno, cookie);
    }
}

fn ok_reply(out: &mut Vec<u8>, ex: &Export, cookie: u64) {
    if ex.structured {
        chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    } else {
        simple_reply(out, 0, cookie);
    }
}

/// The part of a READ's successful reply that comes before the data (the data follows, `len` bytes).
pub fn read_reply_head(out: &mut Vec<u8>, ex: &Export, cookie: u64, offset: u64, len: u32) {
    if ex.structured {
        chunk_header(
            out,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            8 + len,
        );
        out.extend_from_slice(&offset.to_be_bytes());
    } else {
        simple_reply(out, 0, cookie);
    }
}

/// Runs a checked command; `payload` is the WRITE data. Appends the reply to `out`. Reads go straight
/// into `out`, with no intermediate buffer.
pub fn execute(cmd: Command, cookie: u64, payload: &[u8], ex: &Export, out: &mut Vec<u8>) {
    let disk: &dyn Disk = &*ex.disk;
    let done = match cmd {
        Command::Read { offset, len } => {
            let start = out.len();
            read_reply_head(out, ex, cookie, offset, len);
            let data_at = out.len();
            out.resize(data_at + len as usize, 0);
            match disk.read(offset, &mut out[data_at..]) {
                Ok(()) => return,
                Err(e) => {
                    out.truncate(start);
                    Err(e)
                }
            }
        }
        Command::Write { offset, fua, .. } => disk.write(offset, payload, fua),
        Command::Flush => disk.flush(),
        Command::Zero { offset, len, fua } => disk.write_zeroes(offset, len as u64, fua),
        Command::BlockStatus { offset, len, one } => match disk.extents(offset, len as u64) {
            Ok(extents) => {
                block_status(out, cookie, &extents, one);
                return;
            }
            Err(e) => Err(e),
        },
        Command::Cache | Command::Disconnect => Ok(()),
    };
    match done {
        Ok(()) => ok_reply(out, ex, cookie),
        Err(e) => {
            let msg = e.to_string();
            error_reply(out, ex, cookie, disk_errno(&e), &msg);
        }
    }
}

/// A final BLOCK_STATUS chunk for `base:allocation`.
fn block_status(out: &mut Vec<u8>, cookie: u64, extents: &[Extent], one: bool) {
    // Descriptor lengths are 32-bit: long runs are split on 4 KiB boundaries.
    const MAX_RUN: u64 = (u32::MAX as u64) & !4095;
    let mut desc: Vec<(u32, u32)> = Vec::new();
    'outer: for e in extents {
        let flags = (if e.hole { STATE_HOLE } else { 0 }) | (if e.zero { STATE_ZERO } else { 0 });
        let mut left = e.len;
        while left > 0 {
            let n = left.min(MAX_RUN);
            desc.push((n as u32, flags));
            left -= n;
            if one || desc.len() >= 1024 {
                break 'outer;
            }
        }
    }
    chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        4 + 8 * desc.len() as u32,
    );
    out.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for (len, flags) in desc {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests;
