//! Crash safety of slot overlays: corral is killed (SIGKILL) at a random moment during a write load, 20
//! times; after each restart every write acknowledged before a completed FLUSH is there, nothing reads
//! torn or foreign, and the base file is unchanged.
//!
//! The client is tests/common/nbd.rs (fixed newstyle, NBD_OPT_GO, simple replies), so that the test knows
//! exactly which writes a FLUSH covered.

mod common;

use common::nbd::Client;
use common::*;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BLOCK: usize = 4096;
const BLOCKS: u64 = 4096; // 16 MiB

/// A block's contents: its index and generation, repeated (so a torn block is visible).
fn stamp(k: u64, gen: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK);
    while b.len() < BLOCK {
        b.extend_from_slice(&k.to_le_bytes());
        b.extend_from_slice(&gen.to_le_bytes());
    }
    b
}

fn read_stamp(b: &[u8]) -> Option<(u64, u64)> {
    let k = u64::from_le_bytes(b[0..8].try_into().unwrap());
    let g = u64::from_le_bytes(b[8..16].try_into().unwrap());
    (b.chunks(16).all(|c| c == &b[0..16])).then_some((k, g))
}

fn setup(dir: &Path, http: u16, nbd: u16) {
    image(dir, "testos");
    std::fs::create_dir_all(dir.join("disks")).unwrap();
    let mut base = Vec::with_capacity(BLOCKS as usize * BLOCK);
    for k in 0..BLOCKS {
        base.extend_from_slice(&stamp(k, 0));
    }
    std::fs::write(dir.join("disks/base.img"), base).unwrap();
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

use common::Rng;

#[test]
fn acknowledged_flushed_writes_survive_sigkill_20_times() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (http, nbd) = (free_port(), free_port());
    setup(dir, http, nbd);
    let base_before = std::fs::read(dir.join("disks/base.img")).unwrap();
    // Per block: the newest generation a completed FLUSH covered, and the newest written at all.
    let durable = Arc::new(Mutex::new(vec![0u64; BLOCKS as usize]));
    let newest = Arc::new(Mutex::new(vec![0u64; BLOCKS as usize]));
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_u64);
    let mut rng = Rng(seed);
    let mut flushes_total = 0;
    for round in 0..20u64 {
        let server = start(dir, http);
        // After each restart: everything that was flushed is there, nothing is torn or from elsewhere.
        let mut c = Client::connect(nbd, "db/0").unwrap();
        for k in 0..BLOCKS {
            let got = c.request(0, k * BLOCK as u64, BLOCK as u32, &[]).unwrap();
            let Some((sk, g)) = read_stamp(&got) else {
                panic!("round {round}: block {k} is torn (seed {seed})");
            };
            assert_eq!(sk, k, "round {round}: block {k} holds block {sk}'s data");
            let (d, n) = (
                durable.lock().unwrap()[k as usize],
                newest.lock().unwrap()[k as usize],
            );
            assert!(g >= d && g <= n, "round {round}: block {k} has generation {g}; flushed {d}, newest {n} (seed {seed})");
        }
        drop(c);
        // Load: batches of random block writes, each batch followed by a FLUSH, until the kill.
        let (durable_w, newest_w) = (durable.clone(), newest.clone());
        let mut wrng = Rng(rng.next() | 1);
        let writer = std::thread::spawn(move || {
            let mut c = match Client::connect(nbd, "db/0") {
                Ok(c) => c,
                Err(_) => return 0,
            };
            let mut flushes = 0;
            let mut gen = (round + 1) << 32;
            loop {
                let mut batch = Vec::new();
                for _ in 0..16 {
                    let k = wrng.next() % BLOCKS;
                    gen += 1;
                    newest_w.lock().unwrap()[k as usize] = gen;
                    if c.request(1, k * BLOCK as u64, BLOCK as u32, &stamp(k, gen))
                        .is_err()
                    {
                        return flushes;
                    }
                    batch.push((k, gen));
                }
                if c.request(3, 0, 0, &[]).is_err() {
                    return flushes;
                }
                flushes += 1;
                let mut d = durable_w.lock().unwrap();
                for (k, g) in batch {
                    d[k as usize] = d[k as usize].max(g);
                }
            }
        });
        std::thread::sleep(Duration::from_millis(30 + rng.next() % 400));
        server.crash();
        flushes_total += writer.join().unwrap();
    }
    assert!(
        flushes_total > 20,
        "the load barely ran ({flushes_total} flushes)"
    );
    // The overlay is readable as a whole by the operator tools, and the base never changed.
    let _server = start(dir, http);
    drop(_server);
    let (code, out, err) = corral(&[
        "disk",
        "inspect",
        "db/0",
        "--json",
        "--config",
        dir.join("corral.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"written_grains\""), "{out}");
    assert!(
        std::fs::read(dir.join("disks/base.img")).unwrap() == base_before,
        "base changed"
    );
}
