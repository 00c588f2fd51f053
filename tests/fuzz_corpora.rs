//! Replays every committed fuzz corpus (fuzz/corpus/<target>/) and every crash input kept from fuzzing
//! (fuzz/regressions/<target>/) through the same entry functions the cargo-fuzz targets call
//! (`corral::fuzzing`), on the stable toolchain without libFuzzer: an input that once crashed a target, or
//! that the fuzzer found interesting, keeps being checked by every `cargo test`.

use std::path::Path;

fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

#[test]
fn every_corpus_and_regression_input_passes_its_target() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut failed = Vec::new();
    for (name, entry) in corral::fuzzing::TARGETS {
        let corpus = inputs(&fuzz.join("corpus").join(name));
        // A target without a committed corpus would make this test pass while checking nothing.
        assert!(!corpus.is_empty(), "fuzz/corpus/{name} is empty or missing");
        let regressions = inputs(&fuzz.join("regressions").join(name));
        for path in corpus.iter().chain(regressions.iter()) {
            let data = match std::fs::read(path) {
                Ok(d) => d,
                // A fuzzer running meanwhile replaces corpus files.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => panic!("{}: {e}", path.display()),
            };
            if std::panic::catch_unwind(|| entry(&data)).is_err() {
                failed.push(path.display().to_string());
            }
        }
        eprintln!(
            "{name}: {} corpus and {} regression inputs",
            corpus.len(),
            regressions.len()
        );
    }
    assert!(
        failed.is_empty(),
        "inputs that fail their target: {failed:#?}"
    );
}

#[test]
fn every_target_has_a_fuzz_binary() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
    for (name, _) in corral::fuzzing::TARGETS {
        let src = std::fs::read_to_string(fuzz.join("fuzz_targets").join(format!("{name}.rs")))
            .unwrap_or_else(|e| panic!("fuzz/fuzz_targets/{name}.rs: {e}"));
        assert!(
            src.contains(&format!("corral::fuzzing::{name}(")),
            "fuzz/fuzz_targets/{name}.rs does not call corral::fuzzing::{name}"
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] {name}"
        );
    }
}
