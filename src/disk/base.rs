//! Read-only base images: raw files that every slot of a cluster reads through its overlay.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{check_range, file_extents, Disk, DiskError, DiskResult, Extent};

/// A raw image opened read-only. Its size is fixed when opened: replacing a base under running
/// overlays is refused by the overlays' header check.
pub struct Base {
    pub name: String,
    pub path: PathBuf,
    file: File,
    size: u64,
}

impl Base {
    pub fn open(name: &str, path: &Path) -> std::io::Result<Base> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::other(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        Ok(Base {
            name: name.to_string(),
            path: path.to_path_buf(),
            file,
            size: meta.len(),
        })
    }

    /// Reads `buf.len()` bytes at `offset` (inside the image).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Disk for Base {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> DiskResult<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        Ok(self.read_at(offset, buf)?)
    }

    fn pieces(&self, offset: u64, len: u64) -> Option<Vec<super::Piece<'_>>> {
        check_range(self.size, offset, len).ok()?;
        Some(vec![super::Piece {
            file: &self.file,
            offset,
            len,
        }])
    }

    fn write(&self, _: u64, _: &[u8], _: bool) -> DiskResult<()> {
        Err(DiskError::ReadOnly)
    }

    fn flush(&self) -> DiskResult<()> {
        Ok(())
    }

    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> DiskResult<()> {
        Err(DiskError::ReadOnly)
    }

    fn extents(&self, offset: u64, len: u64) -> DiskResult<Vec<Extent>> {
        check_range(self.size, offset, len)?;
        Ok(file_extents(&self.file, self.size, offset, len)?)
    }
}
