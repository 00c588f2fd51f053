//! Latency of the paths a booting node waits on, under the load of a busy farm (issue 16): the script path
//! (`GET /boot/<mac>` of an assigned node) and the DHCP path (DISCOVER→OFFER and REQUEST→ACK, relayed),
//! while thousands of agents heartbeat and new nodes arrive at a steady rate, each arrival a re-plan.
//!
//! Run by `bench/paths.sh`, which starts corral in a namespace and this driver in another (see there).
//! Every request is sent at its scheduled moment (open loop) and its latency counted from that moment, so
//! a server that stalls is charged for the requests that queued behind the stall (no coordinated omission).
//!
//!   paths --http 10.55.0.1:18090 --relay 10.55.0.2 --server 10.55.0.1 --nodes 5000 --secs 30 \
//!         --replans 50 --scripts 200 --dhcp 100 --beat-secs 5

use corral::dhcp::core::encode;
use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    http: String,
    relay: Ipv4Addr,
    server: Ipv4Addr,
    nodes: u32,
    secs: u64,
    replans: u32,
    scripts: u32,
    dhcp: u32,
    beat_secs: u64,
}

fn args() -> Args {
    let mut a = Args {
        http: "10.55.0.1:18090".into(),
        relay: Ipv4Addr::new(10, 55, 0, 2),
        server: Ipv4Addr::new(10, 55, 0, 1),
        nodes: 5000,
        secs: 30,
        replans: 50,
        scripts: 200,
        dhcp: 100,
        beat_secs: 5,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i + 1 < v.len() {
        let val = v[i + 1].clone();
        let num = || {
            val.parse::<u64>()
                .unwrap_or_else(|_| panic!("{}: not a number", v[i]))
        };
        match v[i].as_str() {
            "--http" => a.http = val.clone(),
            "--relay" => a.relay = val.parse().expect("--relay: an IPv4 address"),
            "--server" => a.server = val.parse().expect("--server: an IPv4 address"),
            "--nodes" => a.nodes = num() as u32,
            "--secs" => a.secs = num(),
            "--replans" => a.replans = num() as u32,
            "--scripts" => a.scripts = num() as u32,
            "--dhcp" => a.dhcp = num() as u32,
            "--beat-secs" => a.beat_secs = num(),
            // `cargo bench` passes --bench; anything else is a mistake worth hearing about.
            "--bench" => {
                i += 1;
                continue;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

/// A listed node (in the policy), a newly arriving one, and a DHCP client: three MAC ranges.
fn mac(kind: u8, i: u32) -> String {
    format!(
        "52:54:{kind:02x}:{:02x}:{:02x}:{:02x}",
        (i >> 16) as u8,
        (i >> 8) as u8,
        i as u8
    )
}

/// Latencies of one path, in microseconds, plus the requests that failed.
#[derive(Default)]
struct Samples {
    us: Vec<u64>,
    errors: u64,
}

impl Samples {
    fn line(&mut self, name: &str) -> String {
        self.us.sort_unstable();
        let q = |p: f64| -> f64 {
            if self.us.is_empty() {
                return f64::NAN;
            }
            let i = ((self.us.len() as f64 - 1.0) * p).round() as usize;
            self.us[i] as f64 / 1000.0
        };
        format!(
            "{name:<22} n={:<7} errors={:<5} p50_ms={:.3} p99_ms={:.3} max_ms={:.3}",
            self.us.len(),
            self.errors,
            q(0.5),
            q(0.99),
            q(1.0)
        )
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_idle_connections_per_host(4)
        .build()
}

/// Sleeps until `at`; the caller then measures from `at`, not from when it woke.
fn until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

fn get_script(a: &ureq::Agent, base: &str, mac: &str) -> Result<String, String> {
    a.get(&format!("{base}/boot/{mac}"))
        .call()
        .map_err(|e| e.to_string())?
        .into_string()
        .map_err(|e| e.to_string())
}

/// One request of a load, built from its sequence number; true when it succeeded.
type Request = Arc<dyn Fn(&ureq::Agent, u64) -> bool + Send + Sync>;

/// A DHCP client under way: when its DISCOVER was due, and when its REQUEST was sent.
type InFlight = (Instant, Option<Instant>);

/// Runs `rate` requests a second for `secs`, spread over `threads` threads, each request built by `req`
/// from its sequence number; returns the latencies.
fn open_loop(
    rate: u32,
    secs: u64,
    threads: u32,
    start: Instant,
    req: Request,
) -> std::thread::JoinHandle<Samples> {
    std::thread::spawn(move || {
        if rate == 0 {
            return Samples::default();
        }
        let total = rate as u64 * secs;
        let gap = Duration::from_secs_f64(1.0 / rate as f64);
        let handles: Vec<_> = (0..threads as u64)
            .map(|t| {
                let req = req.clone();
                std::thread::spawn(move || {
                    let a = agent();
                    let mut s = Samples::default();
                    let mut k = t;
                    while k < total {
                        let at = start + gap * k as u32;
                        until(at);
                        if req(&a, k) {
                            s.us.push(at.elapsed().as_micros() as u64);
                        } else {
                            s.errors += 1;
                        }
                        k += threads as u64;
                    }
                    s
                })
            })
            .collect();
        let mut all = Samples::default();
        for h in handles {
            let s = h.join().expect("a load thread panicked");
            all.us.extend(s.us);
            all.errors += s.errors;
        }
        all
    })
}

/// The DHCP load: `rate` new clients a second, each a DISCOVER→OFFER→REQUEST→ACK through a relay at
/// `relay` (corral answers the relay's port 67, as it would a real relay agent).
fn dhcp_load(args: &Args, start: Instant) -> std::thread::JoinHandle<(Samples, Samples)> {
    let (rate, secs, relay, server) = (args.dhcp, args.secs, args.relay, args.server);
    std::thread::spawn(move || {
        let mut offers = Samples::default();
        let mut acks = Samples::default();
        if rate == 0 {
            return (offers, acks);
        }
        let sock = Arc::new(UdpSocket::bind(SocketAddrV4::new(relay, 67)).expect("bind the relay"));
        sock.set_read_timeout(Some(Duration::from_millis(200))).ok();
        let to = SocketAddrV4::new(server, 67);
        let sent: Arc<Mutex<HashMap<u32, InFlight>>> = Default::default();
        let total = rate as u64 * secs;
        let done = Arc::new(AtomicU64::new(0));
        let sender = {
            let (sock, sent) = (sock.clone(), sent.clone());
            std::thread::spawn(move || {
                let gap = Duration::from_secs_f64(1.0 / rate as f64);
                for k in 0..total {
                    let at = start + gap * k as u32;
                    until(at);
                    let xid = 0x4000_0000 | k as u32;
                    let m = request(MessageType::Discover, xid, k as u32, relay, None);
                    sent.lock().unwrap().insert(xid, (at, None));
                    let _ = sock.send_to(&encode(&m), to);
                }
            })
        };
        let mut buf = [0u8; 1500];
        let end = start + Duration::from_secs(secs + 3);
        while Instant::now() < end && done.load(Ordering::Relaxed) < total {
            let Ok((n, _)) = sock.recv_from(&mut buf) else {
                continue;
            };
            // corral's own decoder takes requests only: replies are read with dhcproto's.
            let Ok(reply) = Message::decode(&mut Decoder::new(&buf[..n])) else {
                continue;
            };
            let xid = reply.xid();
            let mut s = sent.lock().unwrap();
            let Some(entry) = s.get_mut(&xid) else {
                continue;
            };
            match reply.opts().msg_type() {
                Some(MessageType::Offer) if entry.1.is_none() => {
                    offers.us.push(entry.0.elapsed().as_micros() as u64);
                    let server_id = match reply.opts().get(OptionCode::ServerIdentifier) {
                        Some(DhcpOption::ServerIdentifier(ip)) => *ip,
                        _ => server,
                    };
                    let m = request(
                        MessageType::Request,
                        xid,
                        xid & 0x00ff_ffff,
                        relay,
                        Some((reply.yiaddr(), server_id)),
                    );
                    entry.1 = Some(Instant::now());
                    let _ = sock.send_to(&encode(&m), to);
                }
                Some(MessageType::Ack) => {
                    if let Some(r) = entry.1 {
                        acks.us.push(r.elapsed().as_micros() as u64);
                    }
                    s.remove(&xid);
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Some(MessageType::Nak) => {
                    acks.errors += 1;
                    s.remove(&xid);
                    done.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        sender.join().ok();
        for (_, (_, req)) in sent.lock().unwrap().iter() {
            match req {
                None => offers.errors += 1,
                Some(_) => acks.errors += 1,
            }
        }
        (offers, acks)
    })
}

/// A relayed client message (hops 1, giaddr the relay), as a relay agent forwards it.
fn request(
    kind: MessageType,
    xid: u32,
    client: u32,
    relay: Ipv4Addr,
    chosen: Option<(Ipv4Addr, Ipv4Addr)>,
) -> Message {
    let hw = [
        0x52,
        0x54,
        0x03,
        (client >> 16) as u8,
        (client >> 8) as u8,
        client as u8,
    ];
    let mut m = Message::new(
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        relay,
        &hw,
    );
    m.set_opcode(Opcode::BootRequest)
        .set_xid(xid)
        .set_hops(1)
        .set_flags(Flags::default());
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    if let Some((ip, server)) = chosen {
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        m.opts_mut().insert(DhcpOption::ServerIdentifier(server));
    }
    m
}

fn main() {
    let args = args();
    let base = format!("http://{}", args.http);
    // Every listed node boots once: its script carries its boot token, which its agent then beats with.
    let t = Instant::now();
    let a = agent();
    let mut tokens = Vec::new();
    for i in 0..args.nodes {
        let script = get_script(&a, &base, &mac(1, i)).unwrap_or_else(|e| panic!("boot {i}: {e}"));
        match script
            .split_whitespace()
            .find_map(|w| w.strip_prefix("corral.token="))
        {
            Some(tok) => tokens.push(tok.to_string()),
            None => panic!("node {i} got no role (is the policy big enough?):\n{script}"),
        }
    }
    println!(
        "setup: {} nodes booted into their roles in {:.1} s",
        args.nodes,
        t.elapsed().as_secs_f64()
    );
    let tokens = Arc::new(tokens);
    let start = Instant::now() + Duration::from_millis(200);
    let (secs, nodes) = (args.secs, args.nodes as u64);
    // Heartbeats: every agent once per interval, spread evenly.
    let beats = {
        let (base, tokens) = (base.clone(), tokens.clone());
        let body = r#"{"load1":0.5,"cpus":8,"mem_total_kib":16000000,"mem_available_kib":8000000,"uptime_secs":100.0,"hostname":"n","groups":[]}"#;
        open_loop(
            (nodes / args.beat_secs.max(1)) as u32,
            secs,
            16,
            start,
            Arc::new(move |a, k| {
                let tok = &tokens[(k % nodes) as usize];
                a.post(&format!("{base}/api/v1/agent/heartbeat"))
                    .set("Authorization", &format!("Bearer {tok}"))
                    .set("Content-Type", "application/json")
                    .send_string(body)
                    .is_ok()
            }),
        )
    };
    // New nodes arriving: each is discovered and planned for.
    let arrivals = {
        let base = base.clone();
        open_loop(
            args.replans,
            secs,
            4,
            start,
            Arc::new(move |a, k| get_script(a, &base, &mac(2, k as u32)).is_ok()),
        )
    };
    // Assigned nodes fetching their scripts again (a reboot, a chain retry).
    let scripts = {
        let base = base.clone();
        open_loop(
            args.scripts,
            secs,
            8,
            start,
            Arc::new(move |a, k| {
                get_script(a, &base, &mac(1, (k * 7919 % nodes) as u32))
                    .is_ok_and(|s| s.contains("corral.token="))
            }),
        )
    };
    let dhcp = dhcp_load(&args, start);
    let mut beats = beats.join().unwrap();
    let mut arrivals = arrivals.join().unwrap();
    let mut scripts = scripts.join().unwrap();
    let (mut offers, mut acks) = dhcp.join().unwrap();
    println!(
        "load: {secs} s; {} heartbeats/s from {nodes} agents, {} arrivals/s (each a re-plan), {} scripts/s, {} DHCP clients/s",
        nodes / args.beat_secs.max(1),
        args.replans,
        args.scripts,
        args.dhcp
    );
    println!("{}", scripts.line("script"));
    println!("{}", offers.line("dhcp_discover_offer"));
    println!("{}", acks.line("dhcp_request_ack"));
    println!("{}", beats.line("heartbeat"));
    println!("{}", arrivals.line("arrival_script"));
}
