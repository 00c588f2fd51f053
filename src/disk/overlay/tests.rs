//! The overlay against a byte-array model: random writes, zeroes and flushes; reads always equal the
//! model; a clean reopen keeps everything; a crash keeps exactly what the last flush covered.

use super::*;
use proptest::prelude::*;

const SIZE: u64 = 64 * 1024 + 1000; // not a whole number of grains: the last grain is short

fn base_bytes() -> Vec<u8> {
    (0..SIZE).map(|i| (i * 7 % 251) as u8 + 1).collect()
}

fn setup() -> (tempfile::TempDir, Arc<Base>, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let bp = dir.path().join("b.img");
    std::fs::write(&bp, base_bytes()).unwrap();
    let base = Arc::new(Base::open("b", &bp).unwrap());
    let stem = dir.path().join("ov").join("0");
    assert!(Overlay::create(&stem, &base).unwrap());
    assert!(!Overlay::create(&stem, &base).unwrap());
    (dir, base, stem)
}

fn read_all(o: &Overlay) -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    o.read(0, &mut v).unwrap();
    v
}

/// The disk as its zero-copy pieces describe it: must equal what `read` gives.
fn read_by_pieces(o: &Overlay, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut v = Vec::new();
    for p in o.pieces(offset, len).unwrap() {
        let mut b = vec![0u8; p.len as usize];
        p.file.read_exact_at(&mut b, p.offset).unwrap();
        v.extend_from_slice(&b);
    }
    v
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>, bool),
    Zero(u64, u64),
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SIZE, 1usize..9000, any::<u8>(), any::<bool>()).prop_map(|(o, n, b, fua)| {
            let n = n.min((SIZE - o) as usize).max(1);
            Op::Write(o, vec![b; n], fua)
        }),
        1 => (0..SIZE, 1u64..20000).prop_map(|(o, n)| Op::Zero(o, n.min(SIZE - o).max(1))),
        1 => Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn matches_model_and_survives_crash(ops in proptest::collection::vec(op(), 1..40)) {
        let (_dir, base, stem) = setup();
        let o = Overlay::open(&stem, base.clone()).unwrap();
        let mut model = base_bytes();
        // Per grain: allocated as of the last flush.
        let grains = SIZE.div_ceil(GRAIN) as usize;
        let mut alloc_now = vec![false; grains];
        let mut alloc_flushed = vec![false; grains];
        for op in &ops {
            match op {
                Op::Write(off, data, fua) => {
                    o.write(*off, data, *fua).unwrap();
                    model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
                    for g in off / GRAIN..=(off + data.len() as u64 - 1) / GRAIN { alloc_now[g as usize] = true; }
                    if *fua { alloc_flushed = alloc_now.clone(); }
                }
                Op::Zero(off, n) => {
                    o.write_zeroes(*off, *n, false).unwrap();
                    model[*off as usize..(*off + *n) as usize].fill(0);
                    for g in off / GRAIN..=(off + n - 1) / GRAIN { alloc_now[g as usize] = true; }
                }
                Op::Flush => { o.flush().unwrap(); alloc_flushed = alloc_now.clone(); }
            }
            prop_assert_eq!(read_all(&o), model.clone());
            prop_assert_eq!(read_by_pieces(&o, 0, SIZE), model.clone());
            prop_assert_eq!(read_by_pieces(&o, 4095, 9000), model[4095..4095 + 9000].to_vec());
        }
        // A killed server: grains allocated by the last flush show their newest data, others the base.
        o.abandon();
        let o = Overlay::open(&stem, base.clone()).unwrap();
        let got = read_all(&o);
        let b = base_bytes();
        for (g, flushed) in alloc_flushed.iter().enumerate() {
            let r = g * GRAIN as usize..((g + 1) * GRAIN as usize).min(SIZE as usize);
            let want = if *flushed { &model[r.clone()] } else { &b[r.clone()] };
            prop_assert_eq!(&got[r.clone()], want, "grain {}", g);
        }
        // The base file itself never changes.
        prop_assert_eq!(std::fs::read(&base.path).unwrap(), b);
    }
}

#[test]
fn clean_close_keeps_everything_and_extents_follow_writes() {
    let (_dir, base, stem) = setup();
    let o = Overlay::open(&stem, base.clone()).unwrap();
    o.write(10, b"hello", false).unwrap();
    o.write_zeroes(GRAIN * 4, GRAIN * 3, false).unwrap();
    let before = read_all(&o);
    assert_eq!(o.allocated_grains(), 1 + 3);
    drop(o);
    let o = Overlay::open(&stem, base).unwrap();
    assert_eq!(read_all(&o), before);
    let (h, grains) = Overlay::inspect(&stem).unwrap();
    assert_eq!((h.size, grains, h.base_name.as_str()), (SIZE, 4, "b"));
    // Trimmed grains are holes that read as zeros.
    let ex = o.extents(GRAIN * 4, GRAIN * 3).unwrap();
    assert_eq!(
        ex,
        vec![Extent {
            len: GRAIN * 3,
            hole: true,
            zero: true
        }]
    );
}

#[test]
fn out_of_range_is_refused_and_a_second_opener_is_locked_out() {
    let (_dir, base, stem) = setup();
    let o = Overlay::open(&stem, base.clone()).unwrap();
    assert!(matches!(
        o.write(SIZE - 1, b"xx", false),
        Err(DiskError::Range)
    ));
    assert!(matches!(
        o.read(u64::MAX - 1, &mut [0u8; 4]),
        Err(DiskError::Range)
    ));
    assert!(matches!(
        o.write_zeroes(SIZE, 1, false),
        Err(DiskError::Range)
    ));
    let e = Overlay::open(&stem, base).err().unwrap();
    assert!(e.to_string().contains("in use"), "{e}");
}

#[test]
fn an_overlay_for_another_base_is_refused() {
    let (dir, _base, stem) = setup();
    let other = dir.path().join("c.img");
    std::fs::write(&other, vec![0u8; 8192]).unwrap();
    let c = Arc::new(Base::open("c", &other).unwrap());
    let e = Overlay::open(&stem, c).err().unwrap();
    assert!(e.to_string().contains("made for base `b`"), "{e}");
}

/// `corral disk export` writes through [`create_new`]: a symlink planted at the output path is refused
/// (its target untouched, dangling or not), and the file made is owner-only whatever the umask allows.
#[test]
fn export_files_are_new_private_and_never_through_a_symlink() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, base, stem) = setup();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let planted = dir.path().join("out.raw.partial");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let e = materialize(&stem, base.clone(), &planted, 0o600, &mut |_, _| {}).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
    assert!(e.to_string().contains("symlink"), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    // A dangling one: following it would create the file it names.
    let dangling = dir.path().join("dangling.raw.partial");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    assert!(materialize(&stem, base.clone(), &dangling, 0o600, &mut |_, _| {}).is_err());
    assert!(!dir.path().join("nowhere").exists());
    // A leftover regular file is not overwritten either.
    let left = dir.path().join("left.raw.partial");
    std::fs::write(&left, b"old").unwrap();
    assert!(materialize(&stem, base.clone(), &left, 0o600, &mut |_, _| {}).is_err());
    assert_eq!(std::fs::read(&left).unwrap(), b"old");

    let out = dir.path().join("fresh.raw.partial");
    materialize(&stem, base, &out, 0o600, &mut |_, _| {}).unwrap();
    let meta = std::fs::symlink_metadata(&out).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read(&out).unwrap(), base_bytes());
}
