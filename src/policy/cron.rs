//! Calendar windows in cron syntax (`minute hour day-of-month month day-of-week`), evaluated against a unix
//! time passed in, so schedules are tested with a fake clock.
//!
//! Supports `*`, numbers, ranges `a-b`, steps `*/n` and `a-b/n`, lists `a,b`, month names `jan`..`dec` and
//! weekday names `sun`..`sat` (0 and 7 are both Sunday). As in Vixie cron, when both day-of-month and
//! day-of-week are restricted, a day matches if either does.
//!
//! Local time is a [`Zone`]: a fixed offset (`settings.utc_offset`) or an IANA time zone
//! (`settings.timezone`, from the tz database bundled into the binary by `jiff`, so a boot host's own
//! tzdata neither has to exist nor decides the answer). With a named zone the offset is looked up at
//! the instant being tested, so a `9-17` window follows daylight saving time: on the day clocks go
//! forward the skipped local hour matches nothing, and on the day they go back the repeated hour
//! matches twice, as wall-clock windows do.

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

    /// Whether the local minute containing `unix` (seconds since the epoch, UTC) is in the window.
    pub fn matches(&self, unix: i64, zone: &Zone) -> bool {
        let t = Civil::from_unix(unix + zone.offset_at(unix));
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

/// The site's local time for schedules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Zone {
    /// A fixed offset from UTC in minutes (`utc_offset = "+01:00"`); never changes with the season.
    Fixed(i32),
    /// An IANA time zone (`timezone = "Europe/Berlin"`), with its daylight saving rules.
    Named {
        name: String,
        tz: jiff::tz::TimeZone,
    },
}

impl Default for Zone {
    fn default() -> Self {
        Zone::Fixed(0)
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Zone::Fixed(m) => {
                let sign = if *m < 0 { '-' } else { '+' };
                write!(f, "UTC{sign}{:02}:{:02}", m.abs() / 60, m.abs() % 60)
            }
            Zone::Named { name, .. } => f.write_str(name),
        }
    }
}

impl Zone {
    /// A zone from the bundled tz database by its IANA name.
    pub fn named(name: &str) -> Result<Zone, String> {
        let tz = jiff::tz::TimeZone::get(name).map_err(|_| {
            format!("`{name}` is not a time zone in the tz database (e.g. `Europe/Berlin`, `UTC`)")
        })?;
        Ok(Zone::Named {
            name: name.to_string(),
            tz,
        })
    }

    /// Seconds to add to UTC for local time at the instant `unix`.
    pub fn offset_at(&self, unix: i64) -> i64 {
        match self {
            Zone::Fixed(m) => *m as i64 * 60,
            Zone::Named { tz, .. } => match jiff::Timestamp::from_second(unix) {
                Ok(ts) => tz.to_offset(ts).seconds() as i64,
                // Outside jiff's range (±9999 years): no schedule is written for then.
                Err(_) => 0,
            },
        }
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

    const UTC: Zone = Zone::Fixed(0);

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
        assert!(!c.matches(MON_0759, &UTC));
        assert!(c.matches(MON_0759 + 60, &UTC)); // 08:00
        assert!(c.matches(MON_0759 + 60 + 12 * 3600 - 60, &UTC)); // 19:59
        assert!(!c.matches(MON_0759 + 60 + 12 * 3600, &UTC)); // 20:00
        assert!(!c.matches(MON_0759 + 60 - 2 * 86_400, &UTC)); // Saturday 08:00
                                                               // A UTC+1 site: 07:59 UTC is 08:59 local.
        assert!(c.matches(MON_0759, &Zone::Fixed(60)));
    }

    #[test]
    fn named_zones_follow_daylight_saving() {
        let berlin = Zone::named("Europe/Berlin").unwrap();
        let nine = Cron::parse("* 9 * * *").unwrap();
        // Winter (CET, +01:00): 09:30 local is 08:30 UTC.
        let jan_0830 = 1_800_001_800; // 2027-01-15 08:30:00 UTC
        assert!(nine.matches(jan_0830, &berlin));
        assert!(!nine.matches(jan_0830 - 3600, &berlin));
        // Summer (CEST, +02:00): 09:30 local is 07:30 UTC; a fixed +01:00 gets this wrong.
        let jul_0730 = 1_814_427_000; // 2027-07-01 07:30:00 UTC
        assert!(nine.matches(jul_0730, &berlin));
        assert!(!nine.matches(jul_0730 + 3600, &berlin));
        assert!(!nine.matches(jul_0730, &Zone::Fixed(60)));
        assert!(nine.matches(jul_0730 + 3600, &Zone::Fixed(60)));
        // Spring forward (2027-03-28 01:00 UTC, 02:00 CET becomes 03:00 CEST): local 02:xx never happens.
        let two = Cron::parse("* 2 * * *").unwrap();
        let spring = 1_806_195_600; // 2027-03-28 01:00:00 UTC
        assert!((-7200..7200)
            .step_by(60)
            .all(|d| !two.matches(spring + d, &berlin)));
        // Fall back (2027-10-31 01:00 UTC, 03:00 CEST becomes 02:00 CET): local 02:xx happens twice.
        let fall = 1_824_944_400; // 2027-10-31 01:00:00 UTC
        let hits = (-7200..7200)
            .step_by(60)
            .filter(|d| two.matches(fall + d, &berlin))
            .count();
        assert_eq!(hits, 120);
        assert_eq!(berlin.to_string(), "Europe/Berlin");
        assert_eq!(Zone::Fixed(-330).to_string(), "UTC-05:30");
        assert!(Zone::named("Mars/Olympus")
            .unwrap_err()
            .contains("not a time zone"));
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
        assert!(c.matches(mon_midnight, &UTC)); // a Monday, not the 1st
        assert!(c.matches(1_798_761_600, &UTC)); // 2027-01-01 00:00 (a Friday, the 1st)
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
