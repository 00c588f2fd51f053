//! `corral disk`: slot overlays seen and handled from their files. Changing commands (reset, commit,
//! export) take the overlay's lock first, so they refuse a disk that a running corral has open for a
//! node; listing and inspecting only read what the last flush wrote.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use corral::config::Config;
use corral::disk::{overlay, Base, DiskSet};

pub enum Action {
    Ls,
    Inspect(String),
    Reset(String),
    Commit(String, String),
    Export(String, PathBuf),
}

pub fn run(config: &Path, action: Action, json: bool) -> ExitCode {
    match go(config, action, json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corral disk: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_slot(s: &str) -> Result<(String, u32), String> {
    let (c, n) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}`: expected <cluster>/<slot>, e.g. db/0"))?;
    let n = n
        .parse()
        .map_err(|_| format!("`{s}`: the slot must be a number"))?;
    Ok((c.to_string(), n))
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Progress on stderr for people (not with --json): percent, rewritten in place.
fn progress(json: bool) -> impl FnMut(u64, u64) {
    let mut last = u64::MAX;
    move |done, total| {
        if json || total == 0 {
            return;
        }
        let pct = done * 100 / total;
        if pct != last {
            last = pct;
            eprint!("\r{pct:3}% ({} of {})", human(done), human(total));
            if done >= total {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        }
    }
}

fn go(config: &Path, action: Action, json: bool) -> Result<(), String> {
    let cfg = Config::load(config).map_err(|d| d.to_string())?;
    let set = DiskSet::new(&cfg.server.disks_dir, &cfg.server.state_dir);
    let slot_of = |s: &str| -> Result<(PathBuf, overlay::Header), String> {
        let (c, n) = parse_slot(s)?;
        let stem = set
            .overlay_stem(&c, n)
            .ok_or_else(|| format!("`{c}` is not a valid cluster name"))?;
        let (h, _) =
            overlay::Overlay::inspect(&stem).map_err(|e| format!("{s}: no overlay ({e})"))?;
        Ok((stem, h))
    };
    let base_of = |h: &overlay::Header| -> Result<Arc<Base>, String> {
        set.base(&h.base_name)
            .map_err(|e| format!("base `{}`: {e}", h.base_name))
    };
    match action {
        Action::Ls => {
            let list = set.list().map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&list).map_err(|e| e.to_string())?
                );
            } else {
                println!(
                    "{:<24} {:<16} {:>10} {:>10}",
                    "SLOT", "BASE", "SIZE", "WRITTEN"
                );
                for d in list {
                    println!(
                        "{:<24} {:<16} {:>10} {:>10}",
                        format!("{}/{}", d.cluster, d.slot),
                        d.base,
                        human(d.size),
                        human(d.written)
                    );
                }
            }
        }
        Action::Inspect(s) => {
            let (stem, h) = slot_of(&s)?;
            let (_, grains) = overlay::Overlay::inspect(&stem).map_err(|e| e.to_string())?;
            let (data, map) = overlay::paths(&stem);
            let on_disk = std::fs::metadata(&data)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0);
            let v = serde_json::json!({
                "slot": s, "base": h.base_name, "size": h.size, "grain": h.grain,
                "written": grains * overlay::GRAIN, "written_grains": grains,
                "data_file": data, "map_file": map, "data_allocated_on_disk": on_disk,
                "in_use": overlay::lock_offline(&stem).is_err(),
            });
            if json {
                println!("{v}");
            } else {
                println!("slot         {s}");
                println!("base         {} ({})", h.base_name, human(h.size));
                println!("grain        {} bytes", h.grain);
                println!(
                    "written      {} ({grains} grains, as of the last flush)",
                    human(grains * overlay::GRAIN)
                );
                println!("on disk      {}", human(on_disk));
                println!("files        {} {}", data.display(), map.display());
                println!("in use       {}", v["in_use"]);
            }
        }
        Action::Reset(s) => {
            let (stem, h) = slot_of(&s)?;
            let base = base_of(&h)?;
            let _lock = overlay::lock_offline(&stem).map_err(|e| format!("{s}: {e}"))?;
            let (data, map) = overlay::paths(&stem);
            std::fs::remove_file(&map).map_err(|e| e.to_string())?;
            std::fs::remove_file(&data).map_err(|e| e.to_string())?;
            overlay::Overlay::create(&stem, &base).map_err(|e| e.to_string())?;
            report(
                json,
                &format!("{s} reset: it reads as base `{}` again", h.base_name),
            );
        }
        Action::Commit(s, name) => {
            let (stem, h) = slot_of(&s)?;
            let target = set
                .base_path(&name)
                .ok_or_else(|| format!("`{name}` is not a valid disk name"))?;
            if target.exists() {
                return Err(format!("{} exists; choose a new name", target.display()));
            }
            let base = base_of(&h)?;
            let tmp = target.with_extension("img.partial");
            // A base is read by the server (which may run as another user), so not 0600; the bases
            // directory is what keeps it from others.
            overlay::materialize(&stem, base, &tmp, 0o644, &mut progress(json))
                .map_err(|e| format!("{s}: {e}"))?;
            std::fs::rename(&tmp, &target).map_err(|e| e.to_string())?;
            report(
                json,
                &format!("{s} committed to new base `{name}` ({})", target.display()),
            );
        }
        Action::Export(s, out) => {
            let (stem, h) = slot_of(&s)?;
            let base = base_of(&h)?;
            // The export is the node's whole disk: both files are created new, owner-only, and never
            // through a symlink planted at their paths. qemu-img then writes into the file made here
            // (it opens without O_EXCL and keeps the mode of a file that exists).
            let raw = out.with_extension("raw.partial");
            overlay::materialize(&stem, base, &raw, 0o600, &mut progress(json))
                .map_err(|e| format!("{s}: {e}"))?;
            if let Err(e) = overlay::create_new(&out, 0o600) {
                let _ = std::fs::remove_file(&raw);
                return Err(format!("{s}: {e}"));
            }
            let status = std::process::Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&out)
                .status();
            let _ = std::fs::remove_file(&raw);
            let failed = match status {
                Ok(st) if st.success() => None,
                Ok(st) => Some(format!("qemu-img convert failed: {st}")),
                Err(e) => Some(format!("qemu-img (qemu-utils) is needed: {e}")),
            };
            if let Some(e) = failed {
                let _ = std::fs::remove_file(&out);
                return Err(e);
            }
            report(json, &format!("{s} exported to {}", out.display()));
        }
    }
    Ok(())
}

fn report(json: bool, msg: &str) {
    if json {
        println!("{}", serde_json::json!({ "ok": true, "message": msg }));
    } else {
        println!("{msg}");
    }
}
