//! The agent's main loop: one thread heartbeats, the other long-polls for orders and carries them out.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::groups;
use super::proto::{Ack, GroupState, GroupStatus, HeartbeatReply, Order, OrderKind};
use super::sample::sample;
use crate::client::{Client, Trust};

/// How the agent is set up: from flags, else from the kernel command line (`corral.api=`,
/// `corral.token=`), else defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// corral's API: `http://host[:port][/prefix]` (or https://).
    pub api: url::Url,
    pub token: String,
    /// Run on a drain order: the application's stop command.
    pub drain_hook: PathBuf,
    /// While this file exists the node reports itself busy.
    pub busy_file: PathBuf,
    pub poweroff: String,
    pub reboot: String,
    /// The image's service groups (skipped when the file does not exist).
    pub groups: PathBuf,
}

pub const USAGE: &str = "usage: corral-agent [--api URL] [--token T] [--drain-hook PATH] [--busy-file PATH] [--poweroff CMD] [--reboot CMD] [--groups PATH]
  Without --api/--token, corral.api= and corral.token= are read from /proc/cmdline (corral puts them
  there for each boot). Defaults: --drain-hook /etc/corral/drain, --busy-file /run/corral/busy,
  --poweroff poweroff, --reboot reboot, --groups /etc/corral/groups.toml (service groups the agent
  starts, checks, restarts and reports; skipped if absent).";

impl Settings {
    pub fn parse(args: &[String], cmdline: &str) -> Result<Settings, String> {
        let from_cmdline = |key: &str| {
            cmdline
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key).map(str::to_string))
        };
        let mut api = from_cmdline("corral.api=");
        let mut token = from_cmdline("corral.token=");
        let mut drain_hook = PathBuf::from("/etc/corral/drain");
        let mut busy_file = PathBuf::from("/run/corral/busy");
        let mut poweroff = "poweroff".to_string();
        let mut reboot = "reboot".to_string();
        let mut groups = PathBuf::from("/etc/corral/groups.toml");
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
            };
            match a.as_str() {
                "--api" => api = Some(value()?),
                "--token" => token = Some(value()?),
                "--drain-hook" => drain_hook = value()?.into(),
                "--busy-file" => busy_file = value()?.into(),
                "--poweroff" => poweroff = value()?,
                "--reboot" => reboot = value()?,
                "--groups" => groups = value()?.into(),
                "-h" | "--help" => return Err(USAGE.into()),
                other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
            }
        }
        let api = api.ok_or_else(|| {
            format!(
                "no corral API: no --api and no corral.api= on the kernel command line\n{USAGE}"
            )
        })?;
        let token = token.ok_or_else(|| {
            format!("no token: no --token and no corral.token= on the kernel command line\n{USAGE}")
        })?;
        Ok(Settings {
            api: crate::client::parse_url(&api, "API URL")?,
            token,
            drain_hook,
            busy_file,
            poweroff,
            reboot,
            groups,
        })
    }
}

/// Runs the hook with `sh -c`, for at most `grace`; returns (ok, detail).
fn run_hook(hook: &std::path::Path, grace: Duration) -> (bool, String) {
    if !hook.exists() {
        return (true, format!("no drain hook at {}", hook.display()));
    }
    let started = Instant::now();
    // An executable hook runs as it is; a plain file is taken as a shell script.
    use std::os::unix::fs::PermissionsExt;
    let executable = std::fs::metadata(hook).is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
    let mut cmd = if executable {
        Command::new(hook)
    } else {
        let mut c = Command::new("sh");
        c.arg(hook);
        c
    };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot run {}: {e}", hook.display())),
    };
    loop {
        match child.try_wait() {
            Ok(Some(st)) => {
                let secs = started.elapsed().as_secs_f64();
                return (
                    st.success(),
                    format!("drain hook exited ({st}) after {secs:.2} s"),
                );
            }
            Ok(None) if started.elapsed() >= grace => {
                let _ = child.kill();
                let _ = child.wait();
                return (
                    false,
                    format!("drain hook still running after {grace:?}: killed"),
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return (false, format!("waiting for the drain hook: {e}")),
        }
    }
}

/// Each request's timeout, but for the long poll for orders.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The server holds a poll for orders this long (`wait=`)...
const POLL_WAIT_SECS: u64 = 25;
/// ... and the agent gives it this long to answer.
const POLL_TIMEOUT: Duration = Duration::from_secs(35);

fn ack(api: &Client, id: u64, ok: bool, detail: String) {
    let body = serde_json::to_vec(&Ack { id, ok, detail }).unwrap_or_default();
    for _ in 0..3 {
        match api.send("POST", "/api/v1/agent/ack", Some(&body)) {
            Ok(r) if r.status < 300 => return,
            Ok(r) => tracing::warn!(status = r.status, "ack refused"),
            Err(e) => tracing::warn!(error = %e, "ack failed"),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The service-group supervisor, while it runs.
struct Supervisor {
    statuses: groups::Statuses,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Supervisor {
    /// Starts the groups of `path`, if it exists; an unreadable file shows as a failed group.
    fn start(path: &std::path::Path) -> Supervisor {
        let statuses: groups::Statuses = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut thread = None;
        match std::fs::read_to_string(path) {
            Err(_) => {}
            Ok(text) => match groups::parse(&text) {
                Ok(gs) => {
                    let (st, sp) = (statuses.clone(), stop.clone());
                    thread = Some(std::thread::spawn(move || groups::run(gs, st, sp)));
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), "service groups: {e}");
                    *statuses.lock().unwrap_or_else(|p| p.into_inner()) = vec![GroupStatus {
                        name: path.display().to_string(),
                        state: GroupState::Failed,
                        detail: e,
                    }];
                }
            },
        }
        Supervisor {
            statuses,
            stop,
            thread: Mutex::new(thread),
        }
    }

    fn statuses(&self) -> Vec<GroupStatus> {
        self.statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops every group (resources in reverse order) and waits for it.
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn carry_out(s: &Settings, api: &Client, sup: &Supervisor, order: Order) {
    tracing::info!(id = order.id, order = order.kind.name(), "order received");
    match order.kind {
        OrderKind::Drain { grace_secs } => {
            // The service groups stop (in reverse dependency order), then the image's own hook runs.
            sup.stop();
            let (ok, detail) = run_hook(&s.drain_hook, Duration::from_secs(grace_secs));
            tracing::info!(ok, "{detail}");
            ack(api, order.id, ok, detail);
        }
        OrderKind::Poweroff | OrderKind::Reboot => {
            let cmd = if order.kind == OrderKind::Poweroff {
                &s.poweroff
            } else {
                &s.reboot
            };
            // Acknowledged first: once the command runs there may be no network left to say so.
            ack(api, order.id, true, format!("running `{cmd}`"));
            // SAFETY: sync(2) takes no arguments and cannot fail.
            unsafe { libc::sync() };
            match Command::new("sh").arg("-c").arg(cmd).status() {
                Ok(st) if st.success() => {}
                Ok(st) => tracing::error!(%st, "`{cmd}` failed"),
                Err(e) => tracing::error!(error = %e, "cannot run `{cmd}`"),
            }
        }
    }
}

fn heartbeats(s: Settings, api: Client, sup: Arc<Supervisor>) {
    let mut interval = Duration::from_secs(5);
    loop {
        let mut hb = sample(s.busy_file.exists());
        hb.groups = sup.statuses();
        let body = serde_json::to_vec(&hb).unwrap_or_default();
        match api.send("POST", "/api/v1/agent/heartbeat", Some(&body)) {
            Ok(r) if r.status == 200 => {
                if let Ok(reply) = serde_json::from_slice::<HeartbeatReply>(&r.body) {
                    interval = Duration::from_secs(reply.interval_secs.clamp(1, 300));
                }
            }
            Ok(r) => {
                tracing::warn!(status = r.status, body = %String::from_utf8_lossy(&r.body), "heartbeat refused")
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        std::thread::sleep(interval);
    }
}

/// Runs until the process is killed (or the node powers off).
pub fn run(s: Settings) {
    let api = match Client::new(
        s.api.as_str(),
        Some(s.token.clone()),
        &Trust::System,
        TIMEOUT,
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("corral API: {e}");
            std::process::exit(2);
        }
    };
    tracing::info!(api = %api.base(), "corral agent started");
    let sup = Arc::new(Supervisor::start(&s.groups));
    let (hb, api2, sup2) = (s.clone(), api.clone(), sup.clone());
    std::thread::spawn(move || heartbeats(hb, api2, sup2));
    let poll = format!("/api/v1/agent/orders?wait={POLL_WAIT_SECS}");
    loop {
        match api.send_within("GET", &poll, None, POLL_TIMEOUT) {
            Ok(r) if r.status == 200 => match serde_json::from_slice::<Order>(&r.body) {
                Ok(order) => carry_out(&s, &api, &sup, order),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable order");
                    std::thread::sleep(Duration::from_secs(1));
                }
            },
            Ok(r) if r.status == 204 => {}
            Ok(r) => {
                tracing::warn!(status = r.status, "orders refused");
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::warn!(error = %e, "waiting for orders failed");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_from_the_kernel_command_line_and_flags() {
        let cl = "console=ttyS0 corral.api=http://10.1.0.1 corral.token=abc quiet";
        let s = Settings::parse(&[], cl).unwrap();
        assert_eq!(
            (s.api.host_str(), s.token.as_str()),
            (Some("10.1.0.1"), "abc")
        );
        assert_eq!(s.drain_hook, PathBuf::from("/etc/corral/drain"));
        let args: Vec<String> = ["--token", "xyz", "--poweroff", "poweroff -f"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let s = Settings::parse(&args, cl).unwrap();
        assert_eq!(
            (s.token.as_str(), s.poweroff.as_str()),
            ("xyz", "poweroff -f")
        );
        assert!(Settings::parse(&[], "console=ttyS0")
            .unwrap_err()
            .contains("no corral API"));
        assert!(Settings::parse(&["--bogus".into()], cl).is_err());
        let e = Settings::parse(&["--api".into(), "ftp://10.1.0.1".into()], cl).unwrap_err();
        assert!(e.contains("API URL `ftp://10.1.0.1`"), "{e}");
        let s =
            Settings::parse(&["--api".into(), "https://boot.example/corral".into()], cl).unwrap();
        assert_eq!(s.api.path(), "/corral");
        assert!(Settings::parse(&["--token".into()], cl).is_err());
    }

    #[test]
    fn a_hook_that_overruns_its_grace_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "#!/bin/sh\nexit 0\n").unwrap();
        let slow = dir.path().join("slow");
        std::fs::write(&slow, "#!/bin/sh\nsleep 5\n").unwrap();
        let (good, _) = run_hook(&ok, Duration::from_secs(5));
        assert!(good);
        let t = Instant::now();
        let (good, detail) = run_hook(&slow, Duration::from_millis(200));
        assert!(!good && detail.contains("killed"), "{detail}");
        assert!(t.elapsed() < Duration::from_secs(4));
        assert!(run_hook(&dir.path().join("none"), Duration::from_secs(1)).0);
    }
}
