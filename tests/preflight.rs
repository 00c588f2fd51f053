//! The install check that runs before the suite (tests/preflight.sh over tests/deps.txt): it must name a
//! command the suite needs when that command is absent, and pass on a machine where tests/deps.sh ran.
//! The absent command is made by a PATH of links to every program on this one except `qemu-img`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/preflight.sh")
}

/// A directory of symlinks to every executable in PATH except those named in `without`.
fn path_without(dir: &Path, without: &[&str]) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let path = std::env::var_os("PATH").unwrap_or_default();
    for d in std::env::split_paths(&path) {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if without.iter().any(|w| name == *w) || bin.join(&name).exists() {
                continue;
            }
            let _ = std::os::unix::fs::symlink(e.path(), bin.join(&name));
        }
    }
    bin
}

fn preflight(path: &std::ffi::OsStr, list: Option<&Path>) -> (i32, String, String) {
    let mut c = Command::new("/bin/bash");
    c.arg(script()).env("PATH", path);
    if let Some(l) = list {
        c.env("CORRAL_DEPS_LIST", l);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn a_missing_command_is_named_and_stops_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = path_without(tmp.path(), &["qemu-img"]);
    assert!(!bin.join("qemu-img").exists());
    let (code, out, err) = preflight(bin.as_os_str(), None);
    assert_eq!(code, 1, "preflight must fail without qemu-img: {out}{err}");
    assert!(
        err.lines()
            .any(|l| l.trim() == "qemu-img (command, from package qemu-utils)"),
        "qemu-img is named with its package: {err}"
    );
    assert!(
        err.contains("sudo tests/deps.sh"),
        "says how to fix it: {err}"
    );
}

#[test]
fn a_missing_file_is_named_and_a_complete_list_passes() {
    // A list of our own: one command that exists, one that does not, one file that exists, one glob that
    // matches nothing, one line of the other set (not checked for the suite).
    let tmp = tempfile::tempdir().unwrap();
    let present = tmp.path().join("present.fd");
    std::fs::write(&present, b"x").unwrap();
    let list = tmp.path().join("deps.txt");
    let path = std::env::var_os("PATH").unwrap();
    std::fs::write(
        &list,
        format!(
            "# comment\nsame-version a b\nbash-pkg suite bash {}\nghost suite no-such-command-corral /nonexistent/*.fd\nbench-only bench no-such-bench-tool\n",
            present.display()
        ),
    )
    .unwrap();
    let (code, _, err) = preflight(&path, Some(&list));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("2 of 4 prerequisites missing"), "{err}");
    assert!(
        err.contains("no-such-command-corral (command, from package ghost)"),
        "{err}"
    );
    assert!(
        err.contains("/nonexistent/*.fd (file, from package ghost)"),
        "{err}"
    );
    assert!(
        !err.contains("no-such-bench-tool"),
        "the bench set is not the suite's: {err}"
    );

    std::fs::write(
        &list,
        format!("bash-pkg suite bash {}\n", present.display()),
    )
    .unwrap();
    let (code, out, err) = preflight(&path, Some(&list));
    assert_eq!(
        (code, out.trim()),
        (0, "preflight: all 1 commands and 1 files present"),
        "{err}"
    );
}

/// The real list on this machine: passes where tests/deps.sh ran (always under tests/run.sh, which runs it
/// first); elsewhere the run records this test as skipped rather than passing it.
#[test]
fn the_suite_s_prerequisites_are_installed() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let (code, out, err) = preflight(&path, None);
    if code != 0 {
        let first = err.lines().next().unwrap_or_default();
        common::skip(&format!(
            "tests/deps.sh has not installed everything ({first})"
        ));
        return;
    }
    assert!(out.starts_with("preflight: all "), "{out}");
}
