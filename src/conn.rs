//! Serving TCP connections on threads, as the disk protocols (NBD, iSCSI) do: a tokio accept loop that
//! hands every connection to a thread of its own, with a check that runs once a second beside it (the
//! rooms close connections whose node left its slot there).
//!
//! Every connection holds a thread until it ends, so the loop bounds them before any byte is read: at
//! most [`Caps::total`] at once and [`Caps::per_peer`] from one address ([`Gate`]). One beyond a cap is
//! accepted and closed at once, without a thread, and counted. The rooms then bound the time a
//! connection may take before it proves anything (the NBD handshake, the iSCSI login) with one
//! [`Deadline`] for the whole exchange, not a timeout per read that a client trickling bytes resets.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::Counter;

/// How many connections a room takes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// In all.
    pub total: usize,
    /// From one address.
    pub per_peer: usize,
}

impl Caps {
    /// No cap at all (tests and tools that serve one client).
    pub const NONE: Caps = Caps {
        total: usize::MAX,
        per_peer: usize::MAX,
    };
}

/// Why a connection was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// The room holds [`Caps::total`] connections already.
    Full,
    /// This address holds [`Caps::per_peer`] already.
    PeerFull,
}

/// The counting behind [`Gate`], without locks or sockets: connections open, in all and per address.
#[derive(Debug, Default)]
pub struct Tally {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

impl Tally {
    /// Counts a connection from `peer` in, unless that would go beyond `caps`.
    pub fn admit(&mut self, caps: Caps, peer: IpAddr) -> Result<(), Busy> {
        if self.total >= caps.total {
            return Err(Busy::Full);
        }
        let n = self.per_peer.entry(peer).or_insert(0);
        if *n >= caps.per_peer {
            return Err(Busy::PeerFull);
        }
        *n += 1;
        self.total += 1;
        Ok(())
    }

    /// Counts a connection from `peer` out (it was admitted). An address with none left is forgotten,
    /// so that the table holds only addresses with open connections.
    pub fn release(&mut self, peer: IpAddr) {
        if let Some(n) = self.per_peer.get_mut(&peer) {
            *n -= 1;
            self.total -= 1;
            if *n == 0 {
                self.per_peer.remove(&peer);
            }
        }
    }

    pub fn open(&self) -> usize {
        self.total
    }

    pub fn from_peer(&self, peer: IpAddr) -> usize {
        self.per_peer.get(&peer).copied().unwrap_or(0)
    }

    /// Addresses with a connection open.
    pub fn peers(&self) -> usize {
        self.per_peer.len()
    }
}

/// A room's connection caps, shared by its accept loop and its connections.
#[derive(Debug)]
pub struct Gate {
    caps: Caps,
    tally: Mutex<Tally>,
    /// Connections closed at once because a cap was reached.
    pub refused_busy: Counter,
}

impl Default for Gate {
    /// A gate that takes every connection (and still counts them).
    fn default() -> Self {
        Gate {
            caps: Caps::NONE,
            tally: Mutex::new(Tally::default()),
            refused_busy: Counter::default(),
        }
    }
}

impl Gate {
    pub fn new(caps: Caps) -> Arc<Gate> {
        Arc::new(Gate {
            caps,
            tally: Mutex::new(Tally::default()),
            refused_busy: Counter::default(),
        })
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        // The tally is consistent after every call, so a panic elsewhere while it was held leaves it usable.
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `peer`: it counts until the returned ticket is dropped. Refusals are
    /// counted.
    pub fn enter(self: &Arc<Self>, peer: IpAddr) -> Result<Ticket, Busy> {
        // One address however it came: an IPv4 client of a dual-stack listener is seen as ::ffff:a.b.c.d.
        let peer = peer.to_canonical();
        match self.tally().admit(self.caps, peer) {
            Ok(()) => Ok(Ticket {
                gate: self.clone(),
                peer,
            }),
            Err(busy) => {
                self.refused_busy.inc();
                Err(busy)
            }
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.tally().open()
    }
}

/// One admitted connection: dropping it (the connection ended, failed or its thread panicked) counts
/// it out of its [`Gate`].
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<Gate>,
    peer: IpAddr,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.tally().release(self.peer);
    }
}

/// Accepts on `listener` until an accepted socket cannot be taken over (the task is dropped otherwise);
/// `handle` runs on a new thread named `<room>-conn` for each connection `gate` admits, `every_second`
/// beside the loop. A connection the gate refuses is closed at once.
pub async fn accept_on_threads<H, C>(
    listener: &tokio::net::TcpListener,
    room: &'static str,
    gate: Arc<Gate>,
    every_second: C,
    handle: H,
) -> anyhow::Result<()>
where
    H: Fn(TcpStream, SocketAddr) + Send + Sync + Clone + 'static,
    C: Fn() + Send + 'static,
{
    let watcher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            every_second();
        }
    });
    let result = loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(room, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ticket = match gate.enter(peer.ip()) {
            Ok(t) => t,
            Err(busy) => {
                tracing::debug!(room, %peer, ?busy, "connection refused: too many at once");
                drop(stream);
                continue;
            }
        };
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => break Err(e.into()),
        };
        let handle = handle.clone();
        // The ticket moves into the thread and is dropped when it ends, by return or by panic; if the
        // thread cannot start, the closure (and the ticket with it) is dropped here.
        let spawned = std::thread::Builder::new()
            .name(format!("{room}-conn"))
            .spawn(move || {
                let _ticket = ticket;
                handle(stream, peer)
            });
        if let Err(e) = spawned {
            tracing::error!(room, error = %e, "cannot start a connection thread");
        }
    };
    watcher.abort();
    result
}

/// Logs how a connection ended: a clean end of stream says nothing.
pub fn log_end(room: &'static str, peer: SocketAddr, result: std::io::Result<()>) {
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => tracing::debug!(room, %peer, error = %e, "connection ended"),
    }
}

/// Whether `e` is a socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO` running out, or a [`Deadline`] passed).
pub fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// TCP keepalive on an accepted socket: a peer that vanished (powered off, cable pulled) is found within
/// about a minute and a half of silence even where the protocol itself never pings (NBD).
pub fn keepalive(stream: &TcpStream) -> std::io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    socket2::SockRef::from(stream).set_tcp_keepalive(&ka)
}

/// A point in time by which a whole exchange (a handshake, a login) must be over.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

impl Deadline {
    pub fn after(now: Instant, d: Duration) -> Deadline {
        Deadline(now + d)
    }

    /// Time left at `now`, `None` once it has passed.
    pub fn left(&self, now: Instant) -> Option<Duration> {
        self.0.checked_duration_since(now).filter(|d| !d.is_zero())
    }

    /// Sets `stream`'s read and write timeouts to the time left, so that the next blocking call ends by
    /// the deadline; a `TimedOut` error once it has passed.
    pub fn arm(&self, stream: &TcpStream) -> std::io::Result<()> {
        let Some(left) = self.left(Instant::now()) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "deadline passed",
            ));
        };
        stream.set_read_timeout(Some(left))?;
        stream.set_write_timeout(Some(left))
    }
}

/// A socket whose every read and write ends by a [`Deadline`] (for exchanges of a few small messages:
/// it sets the socket's timeouts before each call).
pub struct Timed<'a> {
    pub stream: &'a TcpStream,
    pub deadline: Deadline,
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.deadline.arm(self.stream)?;
        let mut s = self.stream;
        s.read(buf)
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.deadline.arm(self.stream)?;
        let mut s = self.stream;
        s.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_in_all_and_per_peer() {
        let caps = Caps {
            total: 4,
            per_peer: 2,
        };
        let mut t = Tally::default();
        let (a, b, c) = (ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3"));
        assert_eq!(t.admit(caps, a), Ok(()));
        assert_eq!(t.admit(caps, a), Ok(()));
        assert_eq!(t.admit(caps, a), Err(Busy::PeerFull));
        assert_eq!(t.from_peer(a), 2, "a refusal counts nothing");
        assert_eq!(t.admit(caps, b), Ok(()));
        assert_eq!(t.admit(caps, c), Ok(()));
        assert_eq!(t.open(), 4);
        assert_eq!(t.admit(caps, ip("10.0.0.4")), Err(Busy::Full));
        assert_eq!(
            t.admit(caps, b),
            Err(Busy::Full),
            "the total before the peer"
        );
        t.release(a);
        assert_eq!(t.admit(caps, ip("10.0.0.4")), Ok(()));
        assert_eq!(t.admit(caps, a), Err(Busy::Full));
    }

    #[test]
    fn released_peers_are_forgotten() {
        let caps = Caps {
            total: 10,
            per_peer: 3,
        };
        let mut t = Tally::default();
        let a = ip("fd00::1");
        for _ in 0..3 {
            t.admit(caps, a).unwrap();
        }
        for _ in 0..3 {
            t.release(a);
        }
        assert_eq!((t.open(), t.peers(), t.from_peer(a)), (0, 0, 0));
        // Releasing what was never admitted changes nothing (and does not underflow).
        t.release(a);
        assert_eq!((t.open(), t.peers()), (0, 0));
        assert_eq!(t.admit(caps, a), Ok(()));
    }

    /// Any sequence of admissions and releases keeps the counts within the caps and equal to what a
    /// plain list of open connections says.
    #[test]
    fn counts_follow_a_model() {
        use proptest::prelude::*;
        proptest!(|(ops in proptest::collection::vec((0u8..4, any::<bool>()), 0..200),
                    total in 1usize..6, per_peer in 1usize..4)| {
            let caps = Caps { total, per_peer };
            let mut t = Tally::default();
            let mut model: Vec<IpAddr> = Vec::new();
            for (who, open) in ops {
                let peer = IpAddr::from([10, 0, 0, who]);
                if open {
                    let here = model.iter().filter(|p| **p == peer).count();
                    let expect = if model.len() >= total {
                        Err(Busy::Full)
                    } else if here >= per_peer {
                        Err(Busy::PeerFull)
                    } else {
                        Ok(())
                    };
                    prop_assert_eq!(t.admit(caps, peer), expect);
                    if expect.is_ok() {
                        model.push(peer);
                    }
                } else if let Some(i) = model.iter().position(|p| *p == peer) {
                    model.remove(i);
                    t.release(peer);
                }
                prop_assert_eq!(t.open(), model.len());
                prop_assert_eq!(t.from_peer(peer), model.iter().filter(|p| **p == peer).count());
                prop_assert!(t.open() <= total);
            }
        });
    }

    #[test]
    fn a_ticket_counts_until_dropped_even_by_a_panic() {
        let gate = Gate::new(Caps {
            total: 8,
            per_peer: 1,
        });
        let a = ip("192.0.2.7");
        let t = gate.enter(a).unwrap();
        assert_eq!(gate.enter(a).unwrap_err(), Busy::PeerFull);
        // The same address seen through a dual-stack listener is the same peer.
        assert_eq!(
            gate.enter(ip("::ffff:192.0.2.7")).unwrap_err(),
            Busy::PeerFull
        );
        assert_eq!(gate.refused_busy.get(), 2);
        drop(t);
        assert_eq!(gate.open(), 0);
        let t = gate.enter(a).unwrap();
        let r = std::thread::spawn(move || {
            let _t = t;
            panic!("a connection thread panics");
        })
        .join();
        assert!(r.is_err());
        assert_eq!(gate.open(), 0, "released by the unwinding thread");
        assert!(gate.enter(a).is_ok());
    }

    #[test]
    fn a_deadline_runs_out() {
        let now = Instant::now();
        let d = Deadline::after(now, Duration::from_secs(2));
        assert_eq!(d.left(now), Some(Duration::from_secs(2)));
        assert_eq!(
            d.left(now + Duration::from_millis(500)),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(d.left(now + Duration::from_secs(2)), None);
        assert_eq!(d.left(now + Duration::from_secs(3)), None);
    }

    /// A reader behind a deadline that has passed gets a timeout at once, without blocking.
    #[test]
    fn a_passed_deadline_stops_reads_and_writes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut t = Timed {
            stream: &server,
            deadline: Deadline(Instant::now() - Duration::from_secs(1)),
        };
        let e = t.read(&mut [0u8; 4]).unwrap_err();
        assert!(timed_out(&e), "{e}");
        let e = t.write(b"x").unwrap_err();
        assert!(timed_out(&e), "{e}");
        drop(client);
    }
}
