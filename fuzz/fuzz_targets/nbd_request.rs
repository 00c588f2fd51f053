//! Request headers alone, against both a writable and a read-only export, with and without structured
//! replies: parse, check and run whatever passes. Nothing may panic.
#![no_main]

#[path = "common.rs"]
mod common;

use corral::nbd::handshake::{transmission_flags, Export};
use corral::nbd::proto::Request;
use corral::nbd::transmit;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, Mutex};

fuzz_target!(|input: &[u8]| {
    if input.len() < Request::SIZE + 1 {
        return;
    }
    let mode = input[0];
    let Ok(req) = Request::parse(input[1..29].try_into().unwrap()) else { return };
    let disk: Arc<dyn corral::disk::Disk> =
        Arc::new(common::Mem(Mutex::new(vec![0; 1 << 16]), mode & 1 == 1));
    let structured = mode & 2 == 2;
    let export = Export {
        name: "x".into(),
        flags: transmission_flags(&*disk, structured),
        disk,
        structured,
        base_allocation: mode & 4 == 4 && structured,
    };
    let payload = &input[29..];
    let mut out = Vec::new();
    match transmit::check(&req, &export) {
        Ok(cmd) if req.payload() as usize <= payload.len() => {
            transmit::execute(cmd, req.cookie, &payload[..req.payload() as usize], &export, &mut out)
        }
        Ok(_) => {}
        Err(r) => transmit::error_reply(&mut out, &export, req.cookie, r.errno, r.why),
    }
});
