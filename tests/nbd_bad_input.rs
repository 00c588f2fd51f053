//! Bad input on the wire: broken handshakes, oversized options, truncated and oversized requests,
//! out-of-range requests. Each gets the protocol's error or a closed connection; the server keeps serving
//! everyone else, never panics, and the overlay still reads what was written.

mod common;

use common::nbd::Client;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

fn setup(dir: &Path, http: u16, nbd: u16) {
    image(dir, "testos");
    std::fs::create_dir_all(dir.join("disks")).unwrap();
    std::fs::write(dir.join("disks/base.img"), vec![1u8; 1 << 20]).unwrap();
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            "[server]\naddress = \"127.0.0.1\"\nstate_dir = \"state\"\nimages_dir = \"images\"\nscripts_dir = \"{}/boot-scripts\"\npolicy = \"policy.toml\"\ndisks_dir = \"disks\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[tftp]\nenabled = false\n[nbd]\nlisten = \"127.0.0.1:{nbd}\"\nadmin_hosts = [\"127.0.0.1\"]\n",
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("policy.toml"),
        "[[cluster]]\nname = \"db\"\nmin = 0\nmax = 1\ndefault = 0\nimages = [\"testos\"]\ndisk = \"base\"\n",
    )
    .unwrap();
}

/// True when the server closed the connection (EOF or reset) within a few seconds.
fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut
            }
        }
    }
}

fn greeted(nbd: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", nbd)).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s
}

#[test]
fn bad_input_is_refused_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (http, nbd) = (free_port(), free_port());
    setup(dir, http, nbd);
    let _server = start(dir, http);

    // A good write first, to check it is intact at the end.
    let mut good = Client::connect(nbd, "db/0").unwrap();
    good.request(1, 8192, 4, b"keep").unwrap();
    good.request(3, 0, 0, &[]).unwrap();

    // Not fixed newstyle.
    let mut s = greeted(nbd);
    s.write_all(&0u32.to_be_bytes()).unwrap();
    assert!(closed(&mut s), "non-fixed-newstyle client not closed");
    // Bad option magic.
    let mut s = greeted(nbd);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").unwrap();
    assert!(closed(&mut s), "bad option magic not closed");
    // An oversized option is refused with ERR_TOO_BIG and the handshake goes on.
    let mut s = greeted(nbd);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let big = 100_000u32;
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&6u32.to_be_bytes());
    opt.extend_from_slice(&big.to_be_bytes());
    opt.extend(std::iter::repeat_n(0u8, big as usize));
    s.write_all(&opt).unwrap();
    let mut r = [0u8; 20];
    s.read_exact(&mut r).unwrap();
    assert_eq!(
        u32::from_be_bytes(r[12..16].try_into().unwrap()),
        (1 << 31) | 9,
        "ERR_TOO_BIG"
    );
    // A handshake cut off in the middle.
    let mut s = greeted(nbd);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"IHAVEOPT\0\0\0\x07\0\0\0\x40abc").unwrap();
    drop(s);

    // In transmission: out of range → ENOSPC/EINVAL replies and the connection stays usable.
    let mut c = Client::connect(nbd, "db/0").unwrap();
    let e = c.request(1, (1 << 20) - 2, 4, b"oops").unwrap_err();
    assert!(e.to_string().contains("nbd error 28"), "{e}");
    let e = c.request(0, u64::MAX - 1, 4, &[]).unwrap_err();
    assert!(e.to_string().contains("nbd error 22"), "{e}");
    assert_eq!(c.request(0, 8192, 4, &[]).unwrap(), b"keep");
    // A request with a bad magic ends the connection.
    c.0.write_all(&[0xde; 28]).unwrap();
    assert!(closed(&mut c.0), "bad request magic not closed");
    // A truncated request, then the client vanishes.
    let mut c = Client::connect(nbd, "db/0").unwrap();
    c.0.write_all(&[0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1, 0])
        .unwrap();
    drop(c);
    // A write announcing 64 MiB of payload: closed, nothing written.
    let mut c = Client::connect(nbd, "db/0").unwrap();
    let mut r = vec![0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1];
    r.extend_from_slice(&1u64.to_be_bytes());
    r.extend_from_slice(&0u64.to_be_bytes());
    r.extend_from_slice(&(64u32 << 20).to_be_bytes());
    c.0.write_all(&r).unwrap();
    c.0.write_all(&[0xff; 4096]).unwrap();
    assert!(closed(&mut c.0), "oversized write not closed");

    // Everyone else is still served, the good data is there, nothing panicked.
    assert_eq!(good.request(0, 8192, 4, &[]).unwrap(), b"keep");
    let mut fresh = Client::connect(nbd, "db/0").unwrap();
    assert_eq!(fresh.request(0, 0, 4, &[]).unwrap(), [1, 1, 1, 1]);
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap();
    assert!(!log.contains("panicked"), "{log}");
    let metrics = get(&format!("http://127.0.0.1:{http}/metrics"));
    let malformed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("corral_nbd_malformed_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("malformed counter");
    assert!(
        malformed >= 4,
        "malformed connections are counted: {malformed}"
    );
}
