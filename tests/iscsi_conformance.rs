//! libiscsi's conformance suite (`iscsi-test-cu` from libiscsi-bin) against corral's iSCSI target on
//! loopback: the ALL family with destructive tests allowed (`-d -t ALL`, the invocation behind the
//! issue's "tgt passes 222 of 230"), on a fresh sparse 1 GiB slot disk. Fails if any test fails.
//! Skipped tests (commands corral does not implement: persistent reservations, RESERVE(6),
//! COMPARE AND WRITE, EXTENDED COPY, ...) are counted, not failed; bench/iscsi-conformance.sh runs
//! the same against tgt side by side.

mod common;

use common::*;
use std::path::Path;
use std::time::Instant;

/// Tests that may fail here because tgt fails them too. Empty: corral passes every test tgt passes
/// and the ones tgt fails (GetLBAStatus.BeyondEol, PrinServiceactionRange.Range, four
/// ProutReserve.Ownership*, Reserve6.2Initiators, iSCSIdatasn.iSCSIDataSnInvalid) pass or skip here.
const ALSO_FAILS_ON_TGT: &[&str] = &[];

fn setup(dir: &Path, http: u16, iscsi: u16) {
    image(dir, "plain");
    std::fs::create_dir_all(dir.join("disks")).unwrap();
    std::fs::File::create(dir.join("disks/base.img"))
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            "[server]\naddress = \"127.0.0.1\"\nstate_dir = \"state\"\nimages_dir = \"images\"\nscripts_dir = \"{}/boot-scripts\"\npolicy = \"policy.toml\"\ndisks_dir = \"disks\"\n[dhcp]\nmode = \"off\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[tftp]\nenabled = false\n[nbd]\nlisten = \"127.0.0.1:{}\"\n[iscsi]\nlisten = \"127.0.0.1:{iscsi}\"\n[[dhcp.reservation]]\nmac = \"52:54:00:00:00:01\"\naddress = \"127.0.0.1\"\n[[dhcp.reservation]]\nmac = \"52:54:00:00:00:02\"\naddress = \"127.0.0.2\"\n",
            env!("CARGO_MANIFEST_DIR"),
            free_port()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("policy.toml"),
        "[settings]\ncooldown = 0\n\n[[cluster]]\nname = \"db\"\nmin = 0\nmax = 1\ndefault = 1\nimages = [\"plain\"]\ndisk = \"base\"\n",
    )
    .unwrap();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pass,
    Fail,
    Skip,
}

/// CUnit's "basic" output → (Suite.Test, outcome). A test that printed `[SKIPPED]` before its
/// "passed" is a skip (libiscsi reports skips with CU_PASS); text after the result is its teardown's.
fn parse(out: &str) -> Vec<(String, Outcome)> {
    let mut results = Vec::new();
    let (mut suite, mut name, mut skip, mut done) = (String::new(), String::new(), false, true);
    for line in out.lines() {
        if let Some(s) = line.strip_prefix("Suite: ") {
            suite = s.to_string();
        } else if let Some(rest) = line.strip_prefix("  Test: ") {
            let (t, after) = rest.split_once(" ...").unwrap_or((rest, ""));
            name = format!("{suite}.{t}");
            (skip, done) = (false, false);
            if after.starts_with("passed") || after.starts_with("FAILED") {
                let o = if after.starts_with("FAILED") {
                    Outcome::Fail
                } else {
                    Outcome::Pass
                };
                results.push((name.clone(), o));
                done = true;
            } else if after.contains("[SKIPPED]") {
                skip = true;
            }
        } else if !done && (line.starts_with("passed") || line.starts_with("FAILED")) {
            let o = match (line.starts_with("FAILED"), skip) {
                (true, _) => Outcome::Fail,
                (false, true) => Outcome::Skip,
                (false, false) => Outcome::Pass,
            };
            results.push((name.clone(), o));
            done = true;
        } else if !done && line.contains("[SKIPPED]") {
            skip = true;
        }
    }
    results
}

#[test]
fn parse_reads_cunit_basic_output() {
    let out = "Suite: A\n  Test: One ...passed\n  Test: Two ...    [SKIPPED] X is not implemented.\n    [SKIPPED] X\npassed\n  Test: Three ...    [FAILED] bad\nFAILED\n    1. t.c:1 - x\n  Test: Four ...passed    [SKIPPED] teardown\n\nSuite: B\n  Test: Five ...FAILED\n";
    assert_eq!(
        parse(out),
        [
            ("A.One".to_string(), Outcome::Pass),
            ("A.Two".to_string(), Outcome::Skip),
            ("A.Three".to_string(), Outcome::Fail),
            ("A.Four".to_string(), Outcome::Pass),
            ("B.Five".to_string(), Outcome::Fail),
        ]
    );
}

#[test]
fn libiscsi_conformance_suite_passes() {
    if !need_root("the conformance run (as tests/run.sh runs it)")
        || !need_tools(&["iscsi-test-cu"])
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (http, iscsi) = (free_port(), free_port());
    setup(dir, http, iscsi);
    let _server = start(dir, iscsi);
    // The node at 127.0.0.1 asks for its script: it fills db/0 and may log in to that slot's target.
    get(&format!(
        "http://127.0.0.1:{http}/boot/52-54-00-00-00-01?buildarch=x86_64"
    ));
    let url = format!("iscsi://127.0.0.1:{iscsi}/iqn.2026-11.io.corral:db.0/0");
    let started = Instant::now();
    let (_, out, err) = run("iscsi-test-cu", &["-d", "-t", "ALL", &url]);
    let took = started.elapsed();
    let results = parse(&out);
    let count = |o: Outcome| results.iter().filter(|r| r.1 == o).count();
    eprintln!(
        "iscsi-test-cu -d -t ALL against corral in {took:.1?}: {} tests, {} pass, {} fail, {} skip",
        results.len(),
        count(Outcome::Pass),
        count(Outcome::Fail),
        count(Outcome::Skip)
    );
    let summary = out
        .lines()
        .skip_while(|l| !l.starts_with("Run Summary"))
        .take(4)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        summary.contains("tests    230"),
        "the ALL family should hold 230 tests: {summary}\n{}{err}",
        tail(&out, 3000)
    );
    assert_eq!(results.len(), 230, "every test's result parsed: {summary}");
    let failed: Vec<&str> = results
        .iter()
        .filter(|(n, o)| *o == Outcome::Fail && !ALSO_FAILS_ON_TGT.contains(&n.as_str()))
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(
        failed.is_empty(),
        "failed: {failed:?}\n{summary}\ncorral log (end):\n{}\noutput (end):\n{}",
        tail(
            &std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default(),
            3000
        ),
        tail(&out, 6000)
    );
}
