//! The `corral` command: `serve` runs the boot server, `check` validates a config, `lab` (built with the
//! `lab` feature, the default) runs corral on an isolated namespace network with VMs netbooting from it.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod cli;
mod serve;

// Serving a script is a burst of small allocations; mimalloc's per-thread pools keep them off a shared
// lock (glibc malloc was the largest cost in the per-node script benchmark).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "corral",
    version,
    about = "Network boot appliance: DHCP/ProxyDHCP, TFTP and HTTP boot server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the boot server (DHCP, TFTP, HTTP) until stopped; SIGHUP reloads images, templates and mappings.
    Serve {
        #[arg(long, default_value = "/etc/corral/corral.toml")]
        config: PathBuf,
    },
    /// Validate a config (and the images and templates it names); print every error as file:line:column.
    Check {
        #[arg(long, default_value = "/etc/corral/corral.toml")]
        config: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run corral on an isolated namespace network with VMs netbooting from it (root; QEMU, OVMF, iPXE, and
    /// the test OS built by tests/testos/build.sh).
    #[cfg(feature = "lab")]
    Lab {
        /// How many VMs (BIOS, UEFI PXE and UEFI iPXE in turn).
        #[arg(long, default_value_t = 3)]
        vms: u32,
        /// DHCP mode: full, or proxy beside dnsmasq as the site DHCP server.
        #[arg(long, default_value = "full")]
        mode: String,
        /// Image catalog with the test OS.
        #[arg(long, default_value = "images")]
        images: PathBuf,
        /// iPXE script templates.
        #[arg(long, default_value = "boot-scripts")]
        scripts: PathBuf,
    },
    /// Clusters: desired, current, min, max, short or not (from a running corral).
    Status(ApiArgs),
    /// Nodes: state, cluster, slot, image, hostname, address (from a running corral).
    Nodes(ApiArgs),
    /// Slot disks: list, inspect, reset (throw changes away), commit (fold into a new base), export (qcow2).
    Disk {
        #[command(subcommand)]
        action: DiskAction,
        #[arg(long, default_value = "/etc/corral/corral.toml", global = true)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Returns a quarantined or failed node to the pool (POST /api/v1/nodes/<mac>/release).
    Release {
        /// The node's MAC.
        mac: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Recent events, oldest first (from a running corral).
    Events {
        #[command(flatten)]
        api: ApiArgs,
        /// How many events.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Subcommand)]
pub enum DiskAction {
    /// Every slot overlay: cluster, slot, base, size, bytes written.
    Ls,
    /// One slot's overlay (`cluster/slot`): header, usage, files.
    Inspect { slot: String },
    /// Throws a slot's changes away: it reads as its base again. Refused while a node has it open.
    Reset { slot: String },
    /// Folds a slot's changes into a new base image `<disks_dir>/<name>.img`.
    Commit { slot: String, name: String },
    /// Writes a slot's disk (base plus changes) as a qcow2 file.
    Export { slot: String, out: PathBuf },
}

#[derive(clap::Args)]
struct ApiArgs {
    /// corral's API address (http:// or https://); default: from the config's api.listen, else
    /// http.listen.
    #[arg(long)]
    url: Option<String>,
    #[arg(long, default_value = "/etc/corral/corral.toml")]
    config: PathBuf,
    /// A file holding the bearer token (mode 600); default: the config's admin token for actions, its read
    /// token (else the admin token) for reads.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl ApiArgs {
    /// The client for a running corral; `admin`: the request needs the admin token.
    fn api(&self, admin: bool) -> Result<cli::Api, ExitCode> {
        let fail = |e: String| {
            eprintln!("corral: {e}");
            ExitCode::from(1)
        };
        let config = corral::config::Config::load(&self.config).ok();
        let token = match &self.token_file {
            Some(p) => Some(corral::config::read_secret_file(p).map_err(fail)?),
            None => config.as_ref().and_then(|c| {
                let t = &c.tokens;
                if admin {
                    t.admin.clone()
                } else {
                    t.read.clone().or_else(|| t.admin.clone())
                }
            }),
        };
        let (base, ca) = match (&self.url, &config) {
            (Some(u), c) => (u.clone(), c.as_ref().and_then(|c| c.api.tls_cert.clone())),
            (None, Some(c)) => match c.api.listen {
                Some(l) => {
                    let scheme = if c.api.tls_cert.is_some() {
                        "https"
                    } else {
                        "http"
                    };
                    (
                        format!("{scheme}://{}", reachable(l)),
                        c.api.tls_cert.clone(),
                    )
                }
                None => (format!("http://{}", reachable(c.http.listen)), None),
            },
            (None, None) => ("http://127.0.0.1:80".to_string(), None),
        };
        cli::Api::new(&base, token, ca.as_deref()).map_err(fail)
    }
}

/// A wildcard listener is reached on loopback.
fn reachable(listen: std::net::SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        format!("127.0.0.1:{}", listen.port())
    } else {
        listen.to_string()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve::main(config),
        Command::Check { config, json } => check(config, json),
        #[cfg(feature = "lab")]
        Command::Lab {
            vms,
            mode,
            images,
            scripts,
        } => {
            let run = || -> anyhow::Result<()> {
                let exe = std::env::current_exe()?;
                corral::lab::demo(
                    &exe,
                    &std::fs::canonicalize(&images)?,
                    &std::fs::canonicalize(&scripts)?,
                    vms,
                    &mode,
                )
            };
            match run() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("corral lab: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Status(a) => match a.api(false) {
            Ok(api) => cli::status(&api, a.json),
            Err(c) => c,
        },
        Command::Nodes(a) => match a.api(false) {
            Ok(api) => cli::nodes(&api, a.json),
            Err(c) => c,
        },
        Command::Disk {
            action,
            config,
            json,
        } => cli::disk::run(&config, action_of(action), json),
        Command::Events { api, limit } => match api.api(false) {
            Ok(c) => cli::events(&c, api.json, limit),
            Err(c) => c,
        },
        Command::Release { mac, api } => match api.api(true) {
            Ok(c) => cli::release(&c, &mac, api.json),
            Err(c) => c,
        },
    }
}

fn action_of(a: DiskAction) -> cli::disk::Action {
    use cli::disk::Action;
    match a {
        DiskAction::Ls => Action::Ls,
        DiskAction::Inspect { slot } => Action::Inspect(slot),
        DiskAction::Reset { slot } => Action::Reset(slot),
        DiskAction::Commit { slot, name } => Action::Commit(slot, name),
        DiskAction::Export { slot, out } => Action::Export(slot, out),
    }
}

fn check(path: PathBuf, json: bool) -> ExitCode {
    let result = corral::config::Config::load(&path).and_then(corral::controller::BootState::load);
    match result {
        Ok(state) => {
            let missing: Vec<String> = state
                .catalog
                .images
                .values()
                .flat_map(|i| {
                    i.missing_files()
                        .into_iter()
                        .map(move |f| format!("image {}: {} is missing", i.name, f))
                })
                .collect();
            if json {
                let v = serde_json::json!({ "ok": true, "errors": [], "warnings": missing, "images": state.catalog.images.keys().collect::<Vec<_>>() });
                println!("{v}");
            } else {
                for w in &missing {
                    println!("warning: {w}");
                }
                println!(
                    "{}: ok ({} images)",
                    path.display(),
                    state.catalog.images.len()
                );
            }
            ExitCode::SUCCESS
        }
        Err(diags) => {
            if json {
                let errs: Vec<_> = diags
                    .0
                    .iter()
                    .map(|d| serde_json::json!({"file": d.file, "line": d.line, "column": d.column, "message": d.message}))
                    .collect();
                println!("{}", serde_json::json!({ "ok": false, "errors": errs }));
            } else {
                eprintln!("{diags}");
            }
            ExitCode::from(1)
        }
    }
}
