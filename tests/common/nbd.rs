//! A minimal NBD client for tests that must control exactly what goes on the wire.

use std::io::{Read, Write};
use std::net::TcpStream;

/// A minimal NBD client: fixed newstyle, NBD_OPT_GO, simple replies, one request at a time.
pub struct Client(pub TcpStream, pub u64);

impl Client {
    pub fn connect(port: u16, export: &str) -> std::io::Result<Client> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g)?;
        assert_eq!(&g[0..16], b"NBDMAGICIHAVEOPT");
        s.write_all(&3u32.to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&7u32.to_be_bytes()); // GO
        opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d)?;
            match kind {
                1 => return Ok(Client(s, 0)),
                3 => continue,
                e => {
                    return Err(std::io::Error::other(format!(
                        "GO refused: {e:#x} {}",
                        String::from_utf8_lossy(&d)
                    )))
                }
            }
        }
    }

    /// Sends one request and waits for its reply; READ data is returned.
    pub fn request(
        &mut self,
        kind: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<Vec<u8>> {
        self.1 += 1;
        let mut r = Vec::with_capacity(28 + payload.len());
        r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&self.1.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(payload);
        self.0.write_all(&r)?;
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h)?;
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x6744_6698);
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), self.1);
        if err != 0 {
            return Err(std::io::Error::other(format!("nbd error {err}")));
        }
        let mut data = vec![0u8; if kind == 0 { len as usize } else { 0 }];
        self.0.read_exact(&mut data)?;
        Ok(data)
    }
}
