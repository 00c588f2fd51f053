//! `corral serve`: binds every listener, tells systemd it is ready only then, and runs until SIGTERM.
//! SIGHUP re-reads the config file and swaps the boot state (images, templates, node mappings); a file with
//! errors is rejected, logged with every position, and the running state stays. Listener addresses and the
//! DHCP mode are read at start only: changing them needs a restart.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use corral::config::Config;
use corral::controller::{BootState, Controller};
use corral::metrics::Registry;
use corral::store::Store;

pub fn main(config_path: PathBuf) -> ExitCode {
    init_tracing();
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(d) => {
            eprintln!("{d}");
            return ExitCode::from(2);
        }
    };
    // A bounded blocking pool (tokio's default allows 512 threads): with the disk targets' connection caps
    // this keeps the thread count under the unit's TasksMax=.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(64)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(run(config_path, config));
    // The DHCP threads block in recv and never finish on their own: do not wait for them.
    rt.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("corral: {e:#}");
            // HTTP workers are OS threads of their own: end the process, not just main's runtime.
            std::process::exit(1)
        }
    }
}

/// journald adds its own timestamps and levels; a terminal wants both.
fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    if under_journal {
        builder.without_time().with_ansi(false).init();
    } else {
        builder.with_ansi(ansi).init();
    }
}

async fn run(config_path: PathBuf, config: Config) -> anyhow::Result<()> {
    let store = Store::open(&config.server.state_dir)?;
    let state = BootState::load(config.clone()).map_err(|d| anyhow::anyhow!("{d}"))?;
    let controller = Controller::new(state, store.clone())?;
    let mut metrics = Registry::default();
    metrics.add(Arc::new(corral::controller::views::ControllerMetrics(
        controller.clone(),
    )));
    let mut tasks = tokio::task::JoinSet::new();
    let liveness = corral::liveness::Liveness::default();

    let http =
        corral::http::HttpServer::bind(config.http.listen, controller.clone(), workers()).await?;
    metrics.add(http.stats());
    metrics.add(controller.store().writer_stats());
    tracing::info!(listen = %http.local_addr(), url = %config.public_url(), "http ready");

    if config.tftp.enabled {
        let tftp = corral::tftp::TftpServer::bind(&config.tftp).await?;
        metrics.add(tftp.stats());
        tracing::info!(listen = %tftp.local_addr(), root = %config.tftp.root.display(), "tftp ready");
        tasks.spawn(async move { tftp.run().await.map_err(|e| e.context("tftp")) });
    }
    if config.dhcp.mode != corral::config::DhcpMode::Off {
        // Nodes in cluster slots get their slot's address.
        let c = controller.clone();
        let fixed: corral::dhcp::server::FixedAddress = Arc::new(move |mac| c.slot_address(mac));
        // What DHCP sees of each node is who the node is (its address, when a boot starts).
        let c = controller.clone();
        let observer: corral::dhcp::server::Observer = Arc::new(move |s| c.dhcp_seen(s));
        let known = controller.clone();
        let dhcp = corral::dhcp::DhcpServer::bind(&config, store.clone())
            .await?
            .with_fixed_addresses(fixed)
            .with_observer(observer)
            .with_liveness(liveness.clone());
        let dhcp = if config.dhcp.reclaim_from_strangers {
            dhcp.with_known(Arc::new(move |mac| known.is_known(mac)))
        } else {
            dhcp
        };
        metrics.add(dhcp.stats());
        tracing::info!(mode = ?config.dhcp.mode, interface = ?config.server.interface, "dhcp ready");
        tasks.spawn(async move { dhcp.run().await.map_err(|e| e.context("dhcp")) });
    }
    // The NBD target runs when the policy gives some cluster a disk (a policy that adds the first disk
    // on reload needs a restart to open the port).
    let has_disks = controller
        .state()
        .policy
        .as_ref()
        .is_some_and(|p| p.clusters.iter().any(|c| c.spec.disk.is_some()));
    if config.nbd.enabled && has_disks {
        let source = Arc::new(corral::controller::disks::NodeDisks(controller.clone()));
        let limits = corral::nbd::server::NbdLimits::from_config(&config.nbd);
        let nbd = corral::nbd::NbdServer::bind(config.nbd.listen, source, limits).await?;
        metrics.add(nbd.stats());
        tracing::info!(listen = %nbd.local_addr(), "nbd ready");
        tasks.spawn(async move { nbd.run().await.map_err(|e| e.context("nbd")) });
    }
    if config.iscsi.enabled && has_disks {
        let source = Arc::new(corral::controller::disks::NodeDisks(controller.clone()));
        let limits = corral::iscsi::server::IscsiLimits::from_config(&config.iscsi);
        let iscsi = corral::iscsi::IscsiServer::bind(config.iscsi.listen, source, limits).await?;
        metrics.add(iscsi.stats());
        tracing::info!(listen = %iscsi.local_addr(), "iscsi ready");
        tasks.spawn(async move { iscsi.run().await.map_err(|e| e.context("iscsi")) });
    }
    let ra = &config.dhcp.router_advertisement;
    if ra.enabled {
        let iface = config.server.interface.clone().unwrap_or_default();
        let prefix = corral::config::parse_prefix6(&ra.prefix).map_err(|e| anyhow::anyhow!(e))?;
        let interval = ra.interval;
        tasks.spawn(async move {
            tokio::task::spawn_blocking(move || corral::dhcp::ra::run(&iface, prefix, interval))
                .await
                .map_err(|e| anyhow::anyhow!("router advertisements: {e}"))?
                .map_err(|e| e.context("router advertisements"))
        });
    }
    let l = liveness.clone();
    tasks.spawn(async move { http.run(metrics, l).await.map_err(|e| e.context("http")) });
    if let Some(interval) = corral::liveness::watchdog_interval() {
        let (c, l) = (controller.clone(), liveness.clone());
        tasks.spawn(async move {
            watchdog(c, l, interval).await;
            Ok(())
        });
    }
    {
        let c = controller.clone();
        tasks.spawn(async move {
            c.run_flusher(Duration::from_millis(250)).await;
            Ok(())
        });
        let c = controller.clone();
        tasks.spawn(async move {
            c.run_planner(Duration::from_secs(2)).await;
            Ok(())
        });
        let c = controller.clone();
        tasks.spawn(async move {
            c.run_mover().await;
            Ok(())
        });
        let c = controller.clone();
        tasks.spawn(async move {
            c.run_work_saver().await;
            Ok(())
        });
        controller.resume_fences();
        let c = controller.clone();
        tasks.spawn(async move {
            c.run_health().await;
            Ok(())
        });
        let c = controller.clone();
        tasks.spawn(async move {
            c.run_retention(Duration::from_secs(300)).await;
            Ok(())
        });
        let (c, path) = (controller.clone(), config_path.clone());
        tasks.spawn(async move {
            watch_files(c, path).await;
            Ok(())
        });
    }
    notify_systemd("READY=1");
    tracing::info!(config = %config_path.display(), "corral is serving");

    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => reload(&controller, &config_path),
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some(done) = tasks.join_next() => {
                // A server task never ends on its own: treat it as fatal so systemd restarts us.
                let err = match done {
                    Ok(Ok(())) => anyhow::anyhow!("a server task stopped"),
                    Ok(Err(e)) => e,
                    Err(e) => anyhow::anyhow!("a server task panicked: {e}"),
                };
                let _ = controller.flush();
                return Err(err);
            }
        }
    }
    notify_systemd("STOPPING=1");
    tracing::info!("stopping");
    tasks.abort_all();
    let c = controller.clone();
    tokio::task::spawn_blocking(move || {
        c.flush()?;
        c.save_work()
    })
    .await??;
    Ok(())
}

/// systemd's watchdog (`WatchdogSec=`): `WATCHDOG=1` at a third of the interval, but only while every
/// event loop beats (HTTP workers, DHCP threads) and the controller's state answers within half the
/// interval (its locks are not stuck). Otherwise the pings stop and systemd restarts corral.
async fn watchdog(
    controller: Arc<Controller>,
    liveness: corral::liveness::Liveness,
    interval: Duration,
) {
    let period = interval / 3;
    loop {
        tokio::time::sleep(period).await;
        let c = controller.clone();
        let probe = tokio::task::spawn_blocking(move || {
            let _ = c.state();
            let _ = c.fleet_state();
            let _ = c.reboot_pending();
        });
        let controller_ok = matches!(tokio::time::timeout(interval / 2, probe).await, Ok(Ok(())));
        let silent = liveness.silent(
            corral::liveness::now_ms(),
            (interval / 2).as_millis() as u64,
        );
        if controller_ok && silent.is_empty() {
            notify_systemd("WATCHDOG=1");
        } else {
            tracing::error!(
                ?silent,
                controller_ok,
                "not answering: the watchdog ping is withheld"
            );
        }
    }
}

/// Size and mtime of the config and policy files: a change to either reloads.
fn stamps(
    controller: &Controller,
    config_path: &std::path::Path,
) -> Vec<Option<(std::time::SystemTime, u64)>> {
    let policy = controller.state().config.server.policy.clone();
    [Some(config_path.to_path_buf()), policy]
        .into_iter()
        .flatten()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len()))
        })
        .collect()
}

/// Reloads when the config or policy file changes on disk (editors and config management rarely send
/// SIGHUP). Polling every two seconds costs two stat calls and needs no inotify permissions.
async fn watch_files(controller: Arc<Controller>, config_path: PathBuf) {
    let mut last = stamps(&controller, &config_path);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = stamps(&controller, &config_path);
        if now != last {
            reload(&controller, &config_path);
            // The reload may have pointed at another policy file: look at what is in force now.
            last = stamps(&controller, &config_path);
        }
    }
}

/// One HTTP worker per core.
fn workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

fn reload(controller: &Arc<Controller>, path: &std::path::Path) {
    notify_systemd("RELOADING=1");
    let result = Config::load(path).and_then(|c| controller.reload(c));
    match result {
        Ok(()) => tracing::info!(config = %path.display(), "reloaded"),
        Err(d) => {
            tracing::error!(config = %path.display(), errors = %d, "reload rejected; the running configuration stays")
        }
    }
    notify_systemd("READY=1");
}

/// sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET (path or abstract `@name`).
fn notify_systemd(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let sent = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
