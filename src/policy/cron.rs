//! Calendar windows in cron syntax (`minute hour day-of-month month day-of-week`), evaluated against a unix
//! time passed in, so schedules are tested with a fake clock.
//!
//! Supports `*`, numbers, ranges `a-b`, steps `*/n` and `a-b/n`, lists `a,b`, month names `jan`..`dec` and
//! weekday names `sun`..`sat` (0 and 7 are both Sunday). As in Vixie cron, when both day-of-month and
//! day-of-week are restricted, a day matches if either does.

use std::fmt;

/// A parsed cron expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    dom_star: bool,
    dow_star: bool,
    source: String,
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl Cron {
    pub fn parse(s: &str) -> Result<Cron, String> {
        let fields: Vec<&str> = s.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "`{s}`: a schedule needs 5 fields (minute hour day-of-month month day-of-week), found {}",
                fields.len()
            ));
        }
        let minutes = field(fields[0], 0, 59, &[], "minute")?;
        let hours = field(fields[1], 0, 23, &[], "hour")? as u32;
        let days = field(fields[2], 1, 31, &[], "day-of-month")? as u32;
        let months = field(fields[3], 1, 12, &MONTHS, "month")? as u16;
        let mut weekdays = field(fields[4], 0, 7, &WEEKDAYS, "day-of-week")?;
        if weekdays & (1 << 7) != 0 {
            weekdays |= 1; // 7 is Sunday too
        }
        Ok(Cron {
            minutes,
            hours,
            days,
            months,
            weekdays: (weekdays & 0x7f) as u8,
            dom_star: fields[2] == "*",
            dow_star: fields[4] == "*",
            source: s.to_string(),
        })
    }

    /// Whether the minute containing `unix` (seconds, UTC shifted by `offset_minutes`) is in the window.
    pub fn matches(&self, unix: i64, offset_minutes: i32) -> bool {
        let t = Civil::from_unix(unix + offset_minutes as i64 * 60);
        let dom = self.days & (1 << t.day) != 0;
        let dow = self.weekdays & (1 << t.weekday) != 0;
        let day = match (self.dom_star, self.dow_star) {
            (true, true) => true,
            (false, true) => dom,
            (true, false) => dow,
            (false, false) => dom || dow,
        };
        self.minutes & (1 << t.minute) != 0
            && self.hours & (1 << t.hour) != 0
            && self.months & (1 << t.month) != 0
            && day
    }
}

/// One field as a bit set of allowed values.
fn field(s: &str, lo: u32, hi: u32, names: &[&str], what: &str) -> Result<u64, String> {
    let mut set = 0u64;
    for part in s.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, st)) => {
                let st: u32 = st
                    .parse()
                    .map_err(|_| format!("{what}: step `{st}` is not a number"))?;
                if st == 0 {
                    return Err(format!("{what}: step must be at least 1"));
                }
                (r, st)
            }
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (
                value(a, lo, hi, names, what)?,
                value(b, lo, hi, names, what)?,
            )
        } else {
            let v = value(range, lo, hi, names, what)?;
            // `5/15` means from 5 to the end, every 15.
            (v, if step > 1 { hi } else { v })
        };
        if a > b {
            return Err(format!("{what}: range `{range}` runs backwards"));
        }
        let mut v = a;
        while v <= b {
            set |= 1 << v;
            v += step;
        }
    }
    Ok(set)
}

fn value(s: &str, lo: u32, hi: u32, names: &[&str], what: &str) -> Result<u32, String> {
    let lower = s.to_ascii_lowercase();
    if let Some(i) = names.iter().position(|n| *n == lower) {
        // Month names start at 1, weekday names at 0.
        return Ok(i as u32 + if names.len() == 12 { 1 } else { 0 });
    }
    let v: u32 = s
        .parse()
        .map_err(|_| format!("{what}: `{s}` is not a number or name"))?;
    if v < lo || v > hi {
        return Err(format!("{what}: {v} is outside {lo}-{hi}"));
    }
    Ok(v)
}

/// A civil (proleptic Gregorian) date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    /// 0 = Sunday.
    pub weekday: u32,
}

impl Civil {
    /// Days-to-civil conversion (the well-known era algorithm), no library and no time zone database.
    pub fn from_unix(t: i64) -> Civil {
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
        Civil {
            year,
            month,
            day,
            hour: (secs / 3600) as u32,
            minute: (secs % 3600 / 60) as u32,
            weekday: (days + 4).rem_euclid(7) as u32, // 1970-01-01 was a Thursday
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-23 is a Monday.
    const MON_0759: i64 = 1_795_420_740; // 2026-11-23 07:59:00 UTC

    #[test]
    fn civil_dates() {
        let c = Civil::from_unix(MON_0759);
        assert_eq!(
            (c.year, c.month, c.day, c.hour, c.minute, c.weekday),
            (2026, 11, 23, 7, 59, 1)
        );
        let c = Civil::from_unix(0);
        assert_eq!((c.year, c.month, c.day, c.weekday), (1970, 1, 1, 4));
        let c = Civil::from_unix(951_782_400); // 2000-02-29
        assert_eq!((c.year, c.month, c.day), (2000, 2, 29));
        let c = Civil::from_unix(-1);
        assert_eq!(
            (c.year, c.month, c.day, c.hour, c.minute),
            (1969, 12, 31, 23, 59)
        );
    }

    #[test]
    fn weekday_office_hours() {
        let c = Cron::parse("* 8-19 * * mon-fri").unwrap();
        assert!(!c.matches(MON_0759, 0));
        assert!(c.matches(MON_0759 + 60, 0)); // 08:00
        assert!(c.matches(MON_0759 + 60 + 12 * 3600 - 60, 0)); // 19:59
        assert!(!c.matches(MON_0759 + 60 + 12 * 3600, 0)); // 20:00
        assert!(!c.matches(MON_0759 + 60 - 2 * 86_400, 0)); // Saturday 08:00
                                                            // A UTC+1 site: 07:59 UTC is 08:59 local.
        assert!(c.matches(MON_0759, 60));
    }

    #[test]
    fn steps_lists_names() {
        let c = Cron::parse("*/15 0,12 1 jan,JUL 7").unwrap();
        assert_eq!(c.minutes, 1 | 1 << 15 | 1 << 30 | 1 << 45);
        assert_eq!(c.hours, 1 | 1 << 12);
        assert_eq!(c.months, 1 << 1 | 1 << 7);
        assert_eq!(c.weekdays, 1);
        assert_eq!(
            Cron::parse("5/20 * * * *").unwrap().minutes,
            1 << 5 | 1 << 25 | 1 << 45
        );
    }

    #[test]
    fn dom_or_dow_when_both_restricted() {
        let c = Cron::parse("0 0 1 * mon").unwrap();
        let mon_midnight = MON_0759 - 7 * 3600 - 59 * 60;
        assert!(c.matches(mon_midnight, 0)); // a Monday, not the 1st
        assert!(c.matches(1_798_761_600, 0)); // 2027-01-01 00:00 (a Friday, the 1st)
    }

    #[test]
    fn errors_say_what_is_wrong() {
        for (s, want) in [
            ("* * * *", "5 fields"),
            ("60 * * * *", "minute: 60 is outside 0-59"),
            ("* 5-2 * * *", "runs backwards"),
            ("*/0 * * * *", "step must be at least 1"),
            ("* * * foo *", "month: `foo`"),
        ] {
            let e = Cron::parse(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
