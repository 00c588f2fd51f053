//! The iSCSI shell: a tokio accept loop and one thread per connection that moves bytes between the
//! socket and the cores (framing, login, session, SCSI). A thread per connection for the same reason as
//! the NBD room: each command is a `pread`/`pwrite` that takes microseconds.

use std::collections::HashMap;
use std::io::{BufWriter, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::login::{self, Chap, Limits, Login, Refusal, SessionKind, Step};
use super::pdu::{self, frame, Frame, FrameError, Numbers};
use super::scsi::Lun;
use super::session::{Event, Session};
use crate::disk::Disk;
use crate::metrics::{write_counter, Counter, Report};

/// What the controller decides for the iSCSI room.
pub trait TargetSource: Send + Sync {
    /// Targets `peer` may see in a discovery session: (IQN, `address:port,tpgt`).
    fn discover(&self, peer: IpAddr) -> Vec<(String, String)>;
    /// Whether `peer` may log in to `iqn`, and with which CHAP secrets (`None`: no authentication).
    fn admit(&self, iqn: &str, peer: IpAddr, initiator: &str) -> Result<Option<Chap>, Refusal>;
    /// The disk behind `iqn` with its identity (serial, NAA), once the login succeeded.
    fn open(&self, iqn: &str, peer: IpAddr) -> Result<(Arc<dyn Disk>, String, u64), String>;
    /// Whether `peer` may still use `iqn` (false once its node left the slot).
    fn still_allowed(&self, iqn: &str, peer: IpAddr) -> bool;
}

#[derive(Default)]
pub struct IscsiStats {
    pub connections: Counter,
    pub logins: Counter,
    pub refused: Counter,
    pub malformed: Counter,
    pub commands: Counter,
    pub revoked: Counter,
}

impl Report for IscsiStats {
    fn report(&self, out: &mut String) {
        for (name, help, v) in [
            (
                "corral_iscsi_connections_total",
                "iSCSI connections accepted",
                &self.connections,
            ),
            (
                "corral_iscsi_logins_total",
                "iSCSI logins that reached the full feature phase",
                &self.logins,
            ),
            (
                "corral_iscsi_refused_total",
                "iSCSI logins refused",
                &self.refused,
            ),
            (
                "corral_iscsi_malformed_total",
                "iSCSI connections closed for protocol violations",
                &self.malformed,
            ),
            (
                "corral_iscsi_commands_total",
                "SCSI commands served over iSCSI",
                &self.commands,
            ),
            (
                "corral_iscsi_revoked_total",
                "iSCSI connections closed because their node left the slot",
                &self.revoked,
            ),
        ] {
            write_counter(out, name, help, v.get());
        }
    }
}

struct Open {
    iqn: String,
    peer: IpAddr,
    stream: TcpStream,
    /// Session identity for reinstatement: (initiator, ISID).
    session: (String, [u8; 6]),
}

#[derive(Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Open>>,
    tsih: AtomicU16,
}

pub struct IscsiServer {
    listener: tokio::net::TcpListener,
    source: Arc<dyn TargetSource>,
    registry: Arc<Registry>,
    stats: Arc<IscsiStats>,
}

impl IscsiServer {
    pub async fn bind(
        addr: SocketAddr,
        source: Arc<dyn TargetSource>,
    ) -> anyhow::Result<IscsiServer> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("iscsi listen {addr}: {e}"))?;
        Ok(IscsiServer {
            listener,
            source,
            registry: Arc::default(),
            stats: Arc::default(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    pub fn stats(&self) -> Arc<IscsiStats> {
        self.stats.clone()
    }

    /// Serves until the task is dropped; every second, closes connections whose node left the slot.
    pub async fn run(self) -> anyhow::Result<()> {
        let (registry, source, stats) = (
            self.registry.clone(),
            self.source.clone(),
            self.stats.clone(),
        );
        let check = move || {
            let open = registry.open.lock().unwrap_or_else(|p| p.into_inner());
            for o in open.values() {
                if !source.still_allowed(&o.iqn, o.peer) {
                    tracing::info!(target_iqn = %o.iqn, peer = %o.peer, "closing iscsi session: its node no longer holds the slot");
                    stats.revoked.inc();
                    let _ = o.stream.shutdown(Shutdown::Both);
                }
            }
        };
        let (source, registry, stats) = (self.source, self.registry, self.stats);
        crate::conn::accept_on_threads(&self.listener, "iscsi", check, move |stream, peer| {
            stats.connections.inc();
            let r = connection(stream, peer, &*source, &registry, &stats);
            crate::conn::log_end("iscsi", peer, r);
        })
        .await
    }
}

/// Reads until the buffer holds a whole PDU; `None` at a clean end of stream between PDUs.
fn next_pdu(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    max_data: u32,
) -> std::io::Result<Option<pdu::Pdu>> {
    loop {
        match frame(buf, max_data) {
            Ok(Frame::Pdu(p, used)) => {
                buf.drain(..used);
                return Ok(Some(p));
            }
            Ok(Frame::Need(n)) => {
                let have = buf.len();
                buf.resize(n.max(have + 4096), 0);
                let got = stream.read(&mut buf[have..])?;
                buf.truncate(have + got);
                if got == 0 {
                    return if have == 0 {
                        Ok(None)
                    } else {
                        Err(std::io::ErrorKind::UnexpectedEof.into())
                    };
                }
            }
            Err(FrameError::DataTooLong { len, max, bhs }) => {
                let _ = stream.write_all(
                    &pdu::reject(pdu::reject::PROTOCOL_ERROR, &bhs, Numbers::default()).encode(),
                );
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("data segment of {len} bytes over {max}"),
                ));
            }
        }
    }
}

struct Lookup<'a> {
    source: &'a dyn TargetSource,
    peer: IpAddr,
}

impl login::Targets for Lookup<'_> {
    fn lookup(&self, target: &str, initiator: &str) -> Result<Option<Chap>, Refusal> {
        self.source.admit(target, self.peer, initiator)
    }
}

fn random(buf: &mut [u8]) {
    // SAFETY: getrandom writes at most buf.len() bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        // Never expected on Linux; a predictable challenge is still better than none at all.
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(151).wrapping_add(7);
        }
    }
}

fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    source: &dyn TargetSource,
    registry: &Registry,
    stats: &IscsiStats,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let limits = Limits::default();
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut login = Login::new(limits);
    let lookup = Lookup {
        source,
        peer: peer.ip(),
    };
    // Login: requests carry at most 8 KiB of text until MaxRecvDataSegmentLength is agreed.
    let (done, first_cmd_sn) = loop {
        let Some(req) = next_pdu(&mut stream, &mut buf, 8192)? else {
            return Ok(());
        };
        let tsih = registry
            .tsih
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1)
            .max(1);
        match login.on_request(&req, &lookup, tsih, &mut random) {
            Step::Continue(r) => stream.write_all(&r.encode())?,
            Step::Complete(r, done) => {
                stream.write_all(&r.encode())?;
                break (done, req.cmd_sn());
            }
            Step::Fail(r) => {
                stats.refused.inc();
                tracing::info!(%peer, status = ?(r.bhs[36], r.bhs[37]), "iscsi login refused");
                stream.write_all(&r.encode())?;
                return Ok(());
            }
        }
    };
    stats.logins.inc();
    stream.set_read_timeout(None)?;
    let mut session = Session::new(done.params, login.next_stat_sn(), first_cmd_sn);
    let (lun, iqn) = match &done.kind {
        SessionKind::Discovery => {
            session.set_targets(source.discover(peer.ip()));
            (None, None)
        }
        SessionKind::Normal { target } => match source.open(target, peer.ip()) {
            Ok((disk, serial, naa)) => (Some(Lun::new(disk, &serial, naa)), Some(target.clone())),
            Err(e) => {
                tracing::warn!(%peer, target = %target, error = %e, "iscsi: cannot open the target's disk");
                return Ok(());
            }
        },
    };
    tracing::info!(%peer, initiator = %done.initiator, target = ?iqn, "iscsi session started");
    // Registered for revocation and reinstatement: a new session with the same initiator and ISID
    // replaces the old one (the booted OS logging in again after iPXE).
    let id = registry.next.fetch_add(1, Ordering::Relaxed);
    if let Some(iqn) = &iqn {
        let mut open = registry.open.lock().unwrap_or_else(|p| p.into_inner());
        let key = (done.initiator.clone(), done.isid);
        for o in open.values() {
            if o.session == key && &o.iqn == iqn {
                let _ = o.stream.shutdown(Shutdown::Both);
            }
        }
        open.insert(
            id,
            Open {
                iqn: iqn.clone(),
                peer: peer.ip(),
                stream: stream.try_clone()?,
                session: key,
            },
        );
    }
    let result = full_feature(
        &mut stream,
        &mut buf,
        &mut session,
        lun.as_ref(),
        done.params.target_max_recv,
        stats,
    );
    registry
        .open
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    result
}

fn full_feature(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    session: &mut Session,
    lun: Option<&Lun>,
    max_data: u32,
    stats: &IscsiStats,
) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(256 * 1024, stream.try_clone()?);
    loop {
        // Flush replies before blocking for more input.
        if buf.len() < pdu::BHS_LEN {
            out.flush()?;
        }
        let p = match next_pdu(stream, buf, max_data) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(()),
            Err(e) => {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    stats.malformed.inc();
                }
                return Err(e);
            }
        };
        let mut events = session.on_pdu(&p);
        while !events.is_empty() {
            let mut next = Vec::new();
            for ev in events {
                match ev {
                    Event::Send(r) => out.write_all(&r.encode())?,
                    Event::Close => {
                        out.flush()?;
                        return Ok(());
                    }
                    Event::Execute {
                        itt,
                        lun: l,
                        cdb,
                        data_out,
                    } => {
                        stats.commands.inc();
                        let reply = match lun {
                            // LUN 0 only.
                            Some(unit) if l == 0 => unit.execute(&cdb, &data_out),
                            _ => super::scsi::Reply::check(super::scsi::Sense::LUN_NOT_SUPPORTED),
                        };
                        next.extend(session.completed(itt, reply));
                    }
                }
            }
            events = next;
        }
    }
}
