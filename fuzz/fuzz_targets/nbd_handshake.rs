//! A whole client byte stream through the NBD cores, as the shell feeds them: client flags, options
//! (header + payload) until an export is chosen, then requests with their payloads. Nothing may panic.
#![no_main]

#[path = "common.rs"]
mod common;

use corral::nbd::handshake::{Handshake, Next};
use corral::nbd::proto::{OptionHeader, Request, MAX_OPTION};
use corral::nbd::transmit;
use libfuzzer_sys::fuzz_target;

fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (a, b) = data.split_at(n);
    *data = b;
    Some(a)
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let mut hs = Handshake::new();
    let Some(flags) = take(&mut data, 4) else { return };
    if hs.client_flags(u32::from_be_bytes(flags.try_into().unwrap())).is_err() {
        return;
    }
    let mut out = Vec::new();
    let export = loop {
        let Some(head) = take(&mut data, 16) else { return };
        let Ok(h) = OptionHeader::parse(head.try_into().unwrap()) else { return };
        out.clear();
        let next = if h.len > MAX_OPTION {
            hs.oversized(h, &mut out)
        } else {
            let Some(payload) = take(&mut data, h.len as usize) else { return };
            hs.option(h, payload, &common::Table, &mut out)
        };
        match next {
            Next::Continue => {}
            // As if the TLS handshake succeeded with the key of one slot: the rest of the stream is the
            // options a TLS client sends.
            Next::StartTls => hs.tls_started("db/0".into()),
            Next::Transmit(e) => break e,
            Next::Close(_) => return,
        }
    };
    while let Some(head) = take(&mut data, Request::SIZE) {
        let Ok(req) = Request::parse(head.try_into().unwrap()) else { return };
        let Some(payload) = take(&mut data, req.payload() as usize) else { return };
        out.clear();
        match transmit::check(&req, &export) {
            Ok(transmit::Command::Disconnect) => return,
            Ok(cmd) => transmit::execute(cmd, req.cookie, payload, &export, &mut out),
            Err(r) => transmit::error_reply(&mut out, &export, req.cookie, r.errno, r.why),
        }
    }
});
