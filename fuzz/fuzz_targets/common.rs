// An in-memory disk and export table for the fuzz targets.

use corral::disk::{Disk, DiskError, DiskResult, Extent};
use corral::nbd::handshake::{Exports, Refusal};
use std::sync::{Arc, Mutex};

pub struct Mem(pub Mutex<Vec<u8>>, pub bool);

impl Disk for Mem {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.1
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> DiskResult<()> {
        let d = self.0.lock().unwrap();
        corral::disk::check_range(d.len() as u64, offset, buf.len() as u64)?;
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _: bool) -> DiskResult<()> {
        if self.1 {
            return Err(DiskError::ReadOnly);
        }
        let mut d = self.0.lock().unwrap();
        corral::disk::check_range(d.len() as u64, offset, data.len() as u64)?;
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> DiskResult<()> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> DiskResult<()> {
        self.write(offset, &vec![0u8; len.min(1 << 20) as usize], fua)
    }
    fn extents(&self, offset: u64, len: u64) -> DiskResult<Vec<Extent>> {
        corral::disk::check_range(self.size(), offset, len)?;
        Ok(vec![Extent { len, hole: false, zero: false }])
    }
}

pub struct Table;

impl Exports for Table {
    fn list(&self) -> Vec<(String, String)> {
        vec![("db/0".into(), String::new()), ("base/b".into(), String::new())]
    }
    fn open(&self, name: &str) -> Result<Arc<dyn Disk>, Refusal> {
        match name {
            "db/0" => Ok(Arc::new(Mem(Mutex::new(vec![0; 1 << 16]), false))),
            "base/b" => Ok(Arc::new(Mem(Mutex::new(vec![1; 1 << 16]), true))),
            "db/1" => Err(Refusal::Policy("no".into())),
            _ => Err(Refusal::Unknown),
        }
    }
}
