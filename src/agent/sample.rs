//! The node's figures, read from /proc. The parsers are plain functions over the files' text so they are
//! tested with fixed inputs; [`sample`] reads the live files.

use super::proto::Heartbeat;

/// The first field of /proc/loadavg.
pub fn load1(loadavg: &str) -> Option<f64> {
    loadavg.split_whitespace().next()?.parse().ok()
}

/// MemTotal and MemAvailable (KiB) from /proc/meminfo.
pub fn memory(meminfo: &str) -> (u64, u64) {
    let mut total = 0;
    let mut avail = 0;
    for line in meminfo.lines() {
        let mut w = line.split_whitespace();
        let (Some(k), Some(v)) = (w.next(), w.next()) else {
            continue;
        };
        let v = v.parse().unwrap_or(0);
        match k {
            "MemTotal:" => total = v,
            "MemAvailable:" => avail = v,
            _ => {}
        }
    }
    (total, avail)
}

/// pswpin and pswpout from /proc/vmstat.
pub fn swapping(vmstat: &str) -> (u64, u64) {
    let mut i = 0;
    let mut o = 0;
    for line in vmstat.lines() {
        match line.split_once(' ') {
            Some(("pswpin", v)) => i = v.trim().parse().unwrap_or(0),
            Some(("pswpout", v)) => o = v.trim().parse().unwrap_or(0),
            _ => {}
        }
    }
    (i, o)
}

/// Sectors read and written by the whole disks named in `disks` (partitions would count twice).
pub fn disk_io(diskstats: &str, disks: &[String]) -> (u64, u64) {
    let mut r = 0;
    let mut w = 0;
    for line in diskstats.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || !disks.iter().any(|d| d == f[2]) {
            continue;
        }
        r += f[5].parse::<u64>().unwrap_or(0);
        w += f[9].parse::<u64>().unwrap_or(0);
    }
    (r, w)
}

/// The first field of /proc/uptime.
pub fn uptime(text: &str) -> f64 {
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A heartbeat from the live system; `busy` comes from the caller.
pub fn sample(busy: bool) -> Heartbeat {
    let disks: Vec<String> = std::fs::read_dir("/sys/block")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with("loop") && !n.starts_with("ram"))
                .collect()
        })
        .unwrap_or_default();
    let (mem_total_kib, mem_available_kib) = memory(&read("/proc/meminfo"));
    let (swap_in, swap_out) = swapping(&read("/proc/vmstat"));
    let (io_read_sectors, io_write_sectors) = disk_io(&read("/proc/diskstats"), &disks);
    Heartbeat {
        load1: load1(&read("/proc/loadavg")).unwrap_or(0.0),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        mem_total_kib,
        mem_available_kib,
        swap_in,
        swap_out,
        io_read_sectors,
        io_write_sectors,
        busy,
        uptime_secs: uptime(&read("/proc/uptime")),
        hostname: read("/proc/sys/kernel/hostname").trim().to_string(),
        groups: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_proc_files() {
        assert_eq!(load1("0.52 0.58 0.59 1/467 12345\n"), Some(0.52));
        assert_eq!(load1(""), None);
        let mi = "MemTotal:       24562172 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(memory(mi), (24562172, 20000000));
        assert_eq!(swapping("pgpgin 5\npswpin 12\npswpout 34\n"), (12, 34));
        let ds = "   8       0 sda 100 0 2000 0 50 0 800 0 0 0 0\n   8       1 sda1 90 0 1900 0 40 0 700 0 0 0 0\n  43       0 nbd0 10 0 64 0 3 0 24 0 0 0 0\n";
        assert_eq!(disk_io(ds, &["sda".into(), "nbd0".into()]), (2064, 824));
        assert_eq!(disk_io("garbage\n", &["sda".into()]), (0, 0));
        assert_eq!(uptime("12.34 5.6\n"), 12.34);
    }
}
