//! How long an HTTP connection may hold its place, as a sans-IO clock: the shell reports what happened on
//! the connection (bytes read, a request's head parsed, a response finished) with `now`, and asks when the
//! connection must be closed and why.
//!
//! hyper's own `header_read_timeout` starts whenever hyper waits for a request head, so it would also close
//! a kept-alive connection between requests after the header timeout: the two limits operators set
//! (`[http] header_timeout` for a request once begun, `idle_timeout` between requests) could not differ.
//! This clock keeps them apart:
//! - a new connection must begin a request within `header_timeout`; a kept-alive one within `idle_timeout`;
//! - once a request's first byte arrived, its head must be complete within `header_timeout` of it (a
//!   client trickling bytes does not move that deadline: slowloris);
//! - while requests are being served, a connection on which no byte moves either way for `idle_timeout`
//!   (a client that stopped reading a response or sending a body) is closed as well.

use std::time::{Duration, Instant};

/// The two limits, in the units the shell uses. A zero duration turns that limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub header: Duration,
    pub idle: Duration,
}

impl Timeouts {
    pub fn from_config(c: &crate::config::HttpConfig) -> Timeouts {
        Timeouts {
            header: Duration::from_secs(c.header_timeout),
            idle: Duration::from_secs(c.idle_timeout),
        }
    }
}

/// Why a connection is closed by the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// A request's head (or a new connection's first request) did not arrive in time.
    Header,
    /// Nothing happened for `idle_timeout`: between requests, or mid-request with no byte moving.
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request to begin; `fresh` while the connection has not had one yet.
    Waiting { since: Instant, fresh: bool },
    /// A request's first byte arrived at `started`; its head is not parsed yet.
    Head { started: Instant },
    /// `in_flight` requests parsed and not yet answered in full.
    Serving { in_flight: usize },
}

/// One connection's clock.
#[derive(Debug, Clone)]
pub struct ConnClock {
    limits: Timeouts,
    phase: Phase,
    /// The last time a byte moved either way.
    last_io: Instant,
}

impl ConnClock {
    pub fn new(limits: Timeouts, now: Instant) -> ConnClock {
        ConnClock {
            limits,
            phase: Phase::Waiting {
                since: now,
                fresh: true,
            },
            last_io: now,
        }
    }

    /// `n` bytes were read from the client.
    pub fn on_read(&mut self, n: usize, now: Instant) {
        if n == 0 {
            return;
        }
        self.last_io = now;
        if let Phase::Waiting { .. } = self.phase {
            self.phase = Phase::Head { started: now };
        }
    }

    /// `n` bytes were written to the client.
    pub fn on_write(&mut self, n: usize, now: Instant) {
        if n > 0 {
            self.last_io = now;
        }
    }

    /// hyper parsed a request's head and handed it to the service.
    pub fn on_request(&mut self, now: Instant) {
        self.last_io = now;
        self.phase = match self.phase {
            Phase::Serving { in_flight } => Phase::Serving {
                in_flight: in_flight + 1,
            },
            _ => Phase::Serving { in_flight: 1 },
        };
    }

    /// A response was written out in full (or abandoned).
    pub fn on_response_done(&mut self, now: Instant) {
        self.last_io = now;
        if let Phase::Serving { in_flight } = self.phase {
            self.phase = if in_flight > 1 {
                Phase::Serving {
                    in_flight: in_flight - 1,
                }
            } else {
                Phase::Waiting {
                    since: now,
                    fresh: false,
                }
            };
        }
    }

    /// When the connection must be closed if nothing else happens, and why (`None`: no limit applies).
    pub fn deadline(&self) -> Option<(Instant, Expiry)> {
        let at = |d: Duration, from: Instant, why| (!d.is_zero()).then(|| (from + d, why));
        match self.phase {
            Phase::Waiting { since, fresh: true } => at(self.limits.header, since, Expiry::Header),
            Phase::Waiting {
                since,
                fresh: false,
            } => at(self.limits.idle, since, Expiry::Idle),
            Phase::Head { started } => at(self.limits.header, started, Expiry::Header),
            Phase::Serving { .. } => at(self.limits.idle, self.last_io, Expiry::Idle),
        }
    }

    /// Whether the connection must be closed at `now`, and why.
    pub fn expired(&self, now: Instant) -> Option<Expiry> {
        self.deadline()
            .and_then(|(at, why)| (now >= at).then_some(why))
    }
}

// ---- The shell: the clock shared by a connection's I/O, its service and its watchdog. ----

/// A connection's clock with the means to wake its watchdog when a deadline comes nearer.
#[derive(Debug)]
pub struct Watch {
    clock: std::sync::Mutex<ConnClock>,
    nearer: tokio::sync::Notify,
}

impl Watch {
    pub fn new(limits: Timeouts, now: Instant) -> std::sync::Arc<Watch> {
        std::sync::Arc::new(Watch {
            clock: std::sync::Mutex::new(ConnClock::new(limits, now)),
            nearer: tokio::sync::Notify::new(),
        })
    }

    /// Applies `f` to the clock, waking the watchdog if the deadline moved earlier.
    fn update(&self, f: impl FnOnce(&mut ConnClock)) {
        let mut c = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        let before = c.deadline().map(|(at, _)| at);
        f(&mut c);
        let after = c.deadline().map(|(at, _)| at);
        drop(c);
        let earlier = match (before, after) {
            (Some(b), Some(a)) => a < b,
            (None, Some(_)) => true,
            _ => false,
        };
        if earlier {
            self.nearer.notify_one();
        }
    }

    pub fn request(&self) {
        self.update(|c| c.on_request(Instant::now()));
    }

    pub fn response_done(&self) {
        self.update(|c| c.on_response_done(Instant::now()));
    }

    /// Resolves when the connection must be closed, with why.
    pub async fn expiry(&self) -> Expiry {
        loop {
            let (deadline, expired) = {
                let c = self.clock.lock().unwrap_or_else(|p| p.into_inner());
                (c.deadline(), c.expired(Instant::now()))
            };
            if let Some(why) = expired {
                return why;
            }
            match deadline {
                Some((at, _)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = self.nearer.notified() => {}
                    }
                }
                None => self.nearer.notified().await,
            }
        }
    }
}

/// A connection's socket that tells its [`Watch`] about every byte moved.
pub struct Watched<T> {
    inner: T,
    watch: std::sync::Arc<Watch>,
}

impl<T> Watched<T> {
    pub fn new(inner: T, watch: std::sync::Arc<Watch>) -> Watched<T> {
        Watched { inner, watch }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.watch.update(|c| c.on_read(n, Instant::now()));
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = polled {
            self.watch.update(|c| c.on_write(n, Instant::now()));
        }
        polled
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = polled {
            self.watch.update(|c| c.on_write(n, Instant::now()));
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that tells its connection's [`Watch`] when hyper is done with it (written in full, or
/// dropped with the connection).
pub struct Tracked<B> {
    inner: B,
    watch: std::sync::Arc<Watch>,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, watch: std::sync::Arc<Watch>) -> Tracked<B> {
        Tracked { inner, watch }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.watch.response_done();
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn clock(t0: Instant) -> ConnClock {
        ConnClock::new(
            Timeouts {
                header: 10 * S,
                idle: 75 * S,
            },
            t0,
        )
    }

    #[test]
    fn a_new_connection_must_begin_within_the_header_timeout() {
        let t0 = Instant::now();
        let c = clock(t0);
        assert_eq!(c.expired(t0 + 9 * S), None);
        assert_eq!(c.expired(t0 + 10 * S), Some(Expiry::Header));
    }

    #[test]
    fn trickled_header_bytes_do_not_move_the_deadline() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        c.on_read(1, t0 + 2 * S);
        for i in 3..12 {
            c.on_read(1, t0 + i * S);
        }
        // The head began at 2 s: it had until 12 s, whatever arrived since.
        assert_eq!(c.expired(t0 + 11 * S), None);
        assert_eq!(c.expired(t0 + 12 * S), Some(Expiry::Header));
    }

    #[test]
    fn kept_alive_connections_wait_for_the_idle_timeout_between_requests() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        c.on_read(100, t0);
        c.on_request(t0);
        c.on_response_done(t0 + S);
        // Past the header timeout but within idle: kept.
        assert_eq!(c.expired(t0 + 30 * S), None);
        assert_eq!(c.deadline(), Some((t0 + 76 * S, Expiry::Idle)));
        assert_eq!(c.expired(t0 + 76 * S), Some(Expiry::Idle));
        // A new request's head is again bounded by the header timeout from its first byte.
        c.on_read(5, t0 + 40 * S);
        assert_eq!(c.expired(t0 + 50 * S), Some(Expiry::Header));
    }

    #[test]
    fn serving_is_bounded_only_by_bytes_not_moving() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        c.on_read(100, t0);
        c.on_request(t0);
        // A long download that keeps writing is never cut.
        for i in 1..300 {
            c.on_write(1 << 16, t0 + i * S);
            assert_eq!(c.expired(t0 + i * S), None);
        }
        // A client that stops reading: 75 s after the last byte moved.
        assert_eq!(c.expired(t0 + 373 * S), None);
        assert_eq!(c.expired(t0 + 374 * S), Some(Expiry::Idle));
    }

    #[test]
    fn pipelined_requests_wait_for_every_response() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        c.on_read(200, t0);
        c.on_request(t0);
        c.on_request(t0);
        c.on_response_done(t0 + S);
        // One still in flight: serving (bounded by I/O), not waiting.
        assert_eq!(c.deadline(), Some((t0 + 76 * S, Expiry::Idle)));
        c.on_response_done(t0 + 2 * S);
        assert_eq!(c.deadline(), Some((t0 + 77 * S, Expiry::Idle)));
        // A stray completion does not underflow.
        c.on_response_done(t0 + 3 * S);
        assert!(c.deadline().is_some());
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let t0 = Instant::now();
        let mut c = ConnClock::new(
            Timeouts {
                header: Duration::ZERO,
                idle: Duration::ZERO,
            },
            t0,
        );
        assert_eq!(c.deadline(), None);
        c.on_read(1, t0);
        assert_eq!(c.deadline(), None);
        c.on_request(t0);
        c.on_response_done(t0);
        assert_eq!(c.expired(t0 + 1_000_000 * S), None);
    }

    #[test]
    fn empty_reads_are_not_activity() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        c.on_read(0, t0 + 5 * S);
        c.on_write(0, t0 + 5 * S);
        assert_eq!(c.deadline(), Some((t0 + 10 * S, Expiry::Header)));
    }
}
