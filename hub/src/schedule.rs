//! Backup schedules (`[[schedule]]` in hub.toml): which VMs are backed up when, checked once at
//! start, and the pure arithmetic of their occurrences. Running them is `jobs/scheduled.rs`.
//!
//! A schedule runs backups (or, with `kind = "replication"`, brings each VM's replica up to date
//! in place) of the VMs it names, or of every VM (`["*"]`, with `exclude`). It fires at local times of day (`at = ["02:00"]`) or at a fixed interval from each
//! local midnight (`every = "6h"`: 00:00, 06:00, 12:00, 18:00), on every day or the days named
//! (`days = ["mon-fri"]`). "Local" is the hub's time zone (`TZ`, else `/etc/localtime`), as for
//! retention periods, so a nightly backup stays at 02:00 across daylight-saving changes: a time
//! that does not exist that day (the hour skipped in spring) fires at the same offset after the
//! gap, and a time that happens twice (the hour repeated in autumn) fires once, at the first
//! (jiff's "compatible" rule, which is also cron's and systemd's). Occurrences are computed, not
//! listed, so an interval of seconds costs nothing more than one of hours.

use std::time::Duration;

use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use node::api::BackupType;
use serde::Deserialize;

/// The most times of day one schedule lists.
pub const MAX_TIMES: usize = 96;
/// The most VMs one schedule names.
pub const MAX_VMS: usize = 1000;
/// The most backups one schedule runs at once.
pub const MAX_PARALLEL: usize = 16;
/// The shortest interval.
pub const MIN_EVERY: Duration = Duration::from_secs(5);

/// `[[schedule]]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleFile {
    /// Its name (API, logs, metrics, the state kept in the repository).
    pub name: String,
    /// VM names, or `["*"]`: every VM of the node (or of every node) at each run.
    pub vms: Vec<String>,
    /// Local times of day, `HH:MM` or `HH:MM:SS`.
    pub at: Option<Vec<String>>,
    /// An interval from each local midnight: `N` and a unit, `s`, `m`, `h` or `d`.
    pub every: Option<String>,
    /// Days it runs on (`mon`..`sun`, ranges like `mon-fri`); every day when unset.
    pub days: Option<Vec<String>>,
    /// `backup` (default) or `replication`: each VM's replica brought up to date in place.
    pub kind: Option<Work>,
    /// With `vms = ["*"]`: VMs left out.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// `incremental` (default: a full backup where there is nothing to build on) or `full`.
    pub backup_type: Option<BackupType>,
    /// Only this node's VMs.
    pub node: Option<String>,
    /// Tags its backups carry.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Backups of this schedule at once (default 1).
    pub parallel: Option<usize>,
    /// Retention applied to a VM's backups once this schedule's backup of it completes, in
    /// place of the hub's `keep_*` (the same keys, declared here again: serde's `flatten` would
    /// lose `deny_unknown_fields`, which turns a typo into an error); none given: the hub's.
    pub keep_backups: Option<u32>,
    /// ... the newest of each of the last N hours.
    pub keep_hourly: Option<u32>,
    /// ... days.
    pub keep_daily: Option<u32>,
    /// ... ISO weeks.
    pub keep_weekly: Option<u32>,
    /// ... months.
    pub keep_monthly: Option<u32>,
    /// ... years.
    pub keep_yearly: Option<u32>,
}

/// What a schedule runs for each VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Work {
    /// A backup into the repository.
    Backup,
    /// A replication run: the VM's replica brought up to date in place.
    Replication,
}

impl Work {
    /// As the config and the API write it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Backup => "backup",
            Self::Replication => "replication",
        }
    }
}

/// Which VMs a schedule backs up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vms {
    /// Every VM its node (or each node) lists when the run starts, but these.
    All {
        /// Left out.
        except: Vec<String>,
    },
    /// These.
    Named(Vec<String>),
}

/// When a schedule fires within a day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum When {
    /// At these local times, sorted, no repeats.
    At(Vec<Time>),
    /// From local midnight on, every this many seconds (under a day).
    Every(u32),
}

/// A schedule, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Name.
    pub name: String,
    /// VMs.
    pub vms: Vms,
    /// Times of day.
    pub when: When,
    /// Days it runs on, Monday first.
    pub days: [bool; 7],
    /// Backups or replication runs.
    pub work: Work,
    /// Full or incremental.
    pub backup_type: BackupType,
    /// Only this node's VMs.
    pub node: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Backups at once.
    pub parallel: usize,
    /// Its `keep_*`, for the backups it makes (empty: they are under the hub's).
    pub retention: crate::retention::Policy,
}

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const SECONDS_PER_DAY: u32 = 86_400;

impl Schedule {
    /// Check a `[[schedule]]`: names, times, interval, days, limits. Nodes and tags are checked
    /// by the caller, which knows the nodes.
    ///
    /// # Errors
    /// What is wrong, naming the schedule and the key.
    pub fn parse(file: ScheduleFile) -> Result<Self, String> {
        let name = file.name;
        if !node::config::valid_name(&name) {
            return Err(format!("schedule name '{name}' must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}"));
        }
        let bad = |what: String| format!("schedule {name}: {what}");
        let vms = match file.vms.as_slice() {
            [] => return Err(bad("vms is empty: name VMs, or [\"*\"] for every VM".into())),
            [all] if all == "*" => Vms::All { except: vm_names(&file.exclude, "exclude").map_err(bad)? },
            names if names.iter().any(|n| n == "*") => {
                return Err(bad("\"*\" (every VM) stands alone in vms".into()));
            }
            _ if !file.exclude.is_empty() => {
                return Err(bad("exclude goes with vms = [\"*\"]: leave the VMs out of vms instead".into()));
            }
            names => Vms::Named(vm_names(names, "vms").map_err(bad)?),
        };
        let work = file.kind.unwrap_or(Work::Backup);
        if work == Work::Replication && (file.backup_type.is_some() || !file.tags.is_empty()) {
            return Err(bad(
                "a replication schedule takes no backup_type or tags: a VM has one replica, kept in place".into(),
            ));
        }
        let when = match (file.at, file.every) {
            (Some(at), None) => When::At(parse_times(&at).map_err(bad)?),
            (None, Some(every)) => When::Every(parse_every(&every).map_err(bad)?),
            _ => return Err(bad("give either at (times of day) or every (an interval), one of them".into())),
        };
        let days = match file.days {
            None => [true; 7],
            Some(days) => parse_days(&days).map_err(bad)?,
        };
        let parallel = file.parallel.unwrap_or(1);
        if !(1..=MAX_PARALLEL).contains(&parallel) {
            return Err(bad(format!("parallel = {parallel}: give 1 to {MAX_PARALLEL}")));
        }
        let keys = [
            file.keep_backups,
            file.keep_hourly,
            file.keep_daily,
            file.keep_weekly,
            file.keep_monthly,
            file.keep_yearly,
        ];
        let retention = crate::retention::Policy::from_keys(keys).map_err(bad)?;
        if work == Work::Replication && !retention.is_empty() {
            return Err(bad("a replication schedule takes no keep_*: a VM has one replica, kept in place".into()));
        }
        Ok(Self {
            name,
            vms,
            when,
            days,
            work,
            backup_type: file.backup_type.unwrap_or(BackupType::Incremental),
            node: file.node,
            tags: file.tags,
            parallel,
            retention,
        })
    }

    /// Whether this is a backup schedule whose runs back up VM `vm` of node `node` (named, or
    /// `"*"` without it in `exclude`; of its `node` only, when it says one).
    pub fn backs_up(&self, vm: &str, node: &str) -> bool {
        let named = match &self.vms {
            Vms::Named(names) => names.iter().any(|n| n == vm),
            Vms::All { except } => !except.iter().any(|n| n == vm),
        };
        self.work == Work::Backup && named && self.node.as_deref().is_none_or(|n| n == node)
    }

    /// Whether this is a backup schedule of `"*"` that leaves VM `vm` of node `node` out on
    /// purpose (its `exclude`): a VM nobody backs up because an operator said so.
    pub fn excludes(&self, vm: &str, node: &str) -> bool {
        let left_out = matches!(&self.vms, Vms::All { except } if except.iter().any(|n| n == vm));
        self.work == Work::Backup && left_out && self.node.as_deref().is_none_or(|n| n == node)
    }

    /// The first occurrence after `after` (`None` only if the calendar ends first).
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let local = after.to_zoned(tz.clone()).datetime();
        // Times well before `after` are passed over without a time-zone lookup (a zone's offset
        // changes by less than a day).
        let from = local.checked_sub(1.day()).ok()?;
        let mut date = local.date().yesterday().ok()?;
        // A week and two days: every schedule fires at least once a week.
        for _ in 0..9 {
            if self.runs_on(date) {
                let found = self
                    .times()
                    .filter(|t| date.to_datetime(*t) >= from)
                    .filter_map(|t| occurrence(date, t, tz))
                    .find(|at| *at > after);
                if found.is_some() {
                    return found;
                }
            }
            date = date.tomorrow().ok()?;
        }
        None
    }

    /// The last occurrence at or before `at`.
    pub fn last_at_or_before(&self, at: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let local = at.to_zoned(tz.clone()).datetime();
        let until = local.checked_add(1.day()).ok()?;
        let mut date = local.date().tomorrow().ok()?;
        for _ in 0..9 {
            if self.runs_on(date) {
                let found = self
                    .times()
                    .filter(|t| date.to_datetime(*t) <= until)
                    .filter_map(|t| occurrence(date, t, tz))
                    .filter(|o| *o <= at)
                    .max();
                if found.is_some() {
                    return found;
                }
            }
            date = date.yesterday().ok()?;
        }
        None
    }

    fn runs_on(&self, date: Date) -> bool {
        self.days[usize::from(date.weekday().to_monday_zero_offset().unsigned_abs())]
    }

    /// The times of day it fires at, in order.
    fn times(&self) -> Box<dyn Iterator<Item = Time> + '_> {
        match &self.when {
            When::At(times) => Box::new(times.iter().copied()),
            When::Every(secs) => Box::new((0..SECONDS_PER_DAY).step_by(*secs as usize).filter_map(time_of_day)),
        }
    }

    /// The schedule as its view shows it: `at 02:00,14:00` or `every 6h`, and the days.
    pub fn describe(&self) -> String {
        let when = match &self.when {
            When::At(times) => {
                let text = |t: &Time| match t.second() {
                    0 => t.strftime("%H:%M").to_string(),
                    _ => t.strftime("%H:%M:%S").to_string(),
                };
                format!("at {}", times.iter().map(text).collect::<Vec<_>>().join(","))
            }
            When::Every(secs) => format!("every {}", format_every(*secs)),
        };
        match self.days == [true; 7] {
            true => when,
            false => {
                let days: Vec<&str> = DAY_NAMES.iter().zip(self.days).filter(|(_, on)| *on).map(|(d, _)| *d).collect();
                format!("{when} on {}", days.join(","))
            }
        }
    }
}

/// VM names, each valid, at most [`MAX_VMS`], repeats dropped.
fn vm_names(names: &[String], key: &str) -> Result<Vec<String>, String> {
    if names.len() > MAX_VMS {
        return Err(format!("{key} names {} VMs: at most {MAX_VMS}", names.len()));
    }
    let mut out: Vec<String> = Vec::new();
    for n in names {
        if !node::config::valid_name(n) {
            return Err(format!("{key}: VM name '{n}' must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}"));
        }
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    Ok(out)
}

/// The instant a local date and time of day stand for (jiff's "compatible" rule for times a
/// daylight-saving change skips or repeats).
fn occurrence(date: Date, time: Time, tz: &TimeZone) -> Option<Timestamp> {
    date.to_datetime(time).to_zoned(tz.clone()).ok().map(|z| z.timestamp())
}

fn time_of_day(secs: u32) -> Option<Time> {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    Time::new(i8::try_from(h).ok()?, i8::try_from(m).ok()?, i8::try_from(s).ok()?, 0).ok()
}

/// `HH:MM` or `HH:MM:SS`, sorted, repeats dropped.
fn parse_times(list: &[String]) -> Result<Vec<Time>, String> {
    if list.is_empty() || list.len() > MAX_TIMES {
        return Err(format!("at lists {} times: give 1 to {MAX_TIMES}", list.len()));
    }
    let mut out = Vec::new();
    for text in list {
        let parts: Vec<&str> = text.split(':').collect();
        let numbers: Option<Vec<u32>> = match parts.as_slice() {
            [_, _] | [_, _, _] if parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit())) => {
                parts.iter().map(|p| p.parse().ok()).collect()
            }
            _ => None,
        };
        let time = match numbers.as_deref() {
            Some([h, m]) if *h < 24 && *m < 60 => time_of_day(h * 3600 + m * 60),
            Some([h, m, s]) if *h < 24 && *m < 60 && *s < 60 => time_of_day(h * 3600 + m * 60 + s),
            _ => None,
        };
        out.push(time.ok_or_else(|| format!("at: '{text}' is not a time of day (HH:MM or HH:MM:SS, 24-hour)"))?);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// `N` and a unit (`s`, `m`, `h`, `d`), at least [`MIN_EVERY`] and at most a day.
fn parse_every(text: &str) -> Result<u32, String> {
    let bad = || format!("every = '{text}': give a number and s, m, h or d (\"30m\", \"6h\", \"1d\"), from 5s to 1d");
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = text.split_at(split);
    let n: u32 = n.parse().map_err(|_| bad())?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => SECONDS_PER_DAY,
        _ => return Err(bad()),
    };
    let secs = n.checked_mul(unit).ok_or_else(bad)?;
    if u64::from(secs) < MIN_EVERY.as_secs() || secs > SECONDS_PER_DAY {
        return Err(bad());
    }
    Ok(secs)
}

fn format_every(secs: u32) -> String {
    match secs {
        s if s % SECONDS_PER_DAY == 0 => format!("{}d", s / SECONDS_PER_DAY),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// `mon`..`sun` and ranges (`mon-fri`, `sat-sun`; `fri-mon` wraps).
fn parse_days(list: &[String]) -> Result<[bool; 7], String> {
    let day = |name: &str| {
        DAY_NAMES.iter().position(|d| d.eq_ignore_ascii_case(name)).ok_or_else(|| {
            format!("days: '{name}' is not a day (mon, tue, wed, thu, fri, sat, sun, or a range: mon-fri)")
        })
    };
    let mut days = [false; 7];
    for item in list {
        match item.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (day(from)?, day(to)?);
                let mut d = from;
                loop {
                    days[d] = true;
                    if d == to {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day(item)?] = true,
        }
    }
    if days == [false; 7] {
        return Err("days is empty: leave it out for every day".into());
    }
    Ok(days)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(at: Option<&[&str]>, every: Option<&str>, days: Option<&[&str]>) -> ScheduleFile {
        ScheduleFile {
            name: "s".into(),
            vms: vec!["vm1".into()],
            at: at.map(|a| a.iter().map(|s| s.to_string()).collect()),
            every: every.map(str::to_string),
            days: days.map(|d| d.iter().map(|s| s.to_string()).collect()),
            ..ScheduleFile::default()
        }
    }

    fn ts(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn times_of_day_fire_on_the_days_named() {
        let s = Schedule::parse(file(Some(&["14:00", "02:00", "02:00"]), None, Some(&["mon-fri"]))).unwrap();
        assert_eq!(s.describe(), "at 02:00,14:00 on mon,tue,wed,thu,fri");
        let odd = Schedule::parse(file(Some(&["23:59:30"]), None, None)).unwrap();
        assert_eq!(odd.describe(), "at 23:59:30");
        let utc = TimeZone::UTC;
        // 2026-11-27 is a Friday.
        assert_eq!(s.next_after(ts("2026-11-27T01:00:00Z"), &utc), Some(ts("2026-11-27T02:00:00Z")));
        assert_eq!(s.next_after(ts("2026-11-27T02:00:00Z"), &utc), Some(ts("2026-11-27T14:00:00Z")));
        // Past Friday's last: Monday's first.
        assert_eq!(s.next_after(ts("2026-11-27T14:00:00Z"), &utc), Some(ts("2026-11-30T02:00:00Z")));
        assert_eq!(s.last_at_or_before(ts("2026-11-30T01:59:59Z"), &utc), Some(ts("2026-11-27T14:00:00Z")));
        assert_eq!(s.last_at_or_before(ts("2026-11-30T02:00:00Z"), &utc), Some(ts("2026-11-30T02:00:00Z")));
    }

    #[test]
    fn intervals_count_from_each_local_midnight() {
        let s = Schedule::parse(file(None, Some("7h"), None)).unwrap();
        assert_eq!(s.describe(), "every 7h");
        let utc = TimeZone::UTC;
        // 00, 07, 14, 21, then the next midnight (not 04:00).
        assert_eq!(s.next_after(ts("2026-11-27T21:00:00Z"), &utc), Some(ts("2026-11-28T00:00:00Z")));
        assert_eq!(s.next_after(ts("2026-11-27T13:59:59Z"), &utc), Some(ts("2026-11-27T14:00:00Z")));
        let tokyo = TimeZone::fixed(jiff::tz::offset(9));
        // 07:00 in Tokyo is 22:00 UTC the day before.
        assert_eq!(s.next_after(ts("2026-11-27T16:00:00Z"), &tokyo), Some(ts("2026-11-27T22:00:00Z")));
        let fast = Schedule::parse(file(None, Some("5s"), None)).unwrap();
        assert_eq!(fast.next_after(ts("2026-11-27T23:59:57Z"), &utc), Some(ts("2026-11-28T00:00:00Z")));
        assert_eq!(fast.last_at_or_before(ts("2026-11-27T23:59:57Z"), &utc), Some(ts("2026-11-27T23:59:55Z")));
    }

    #[test]
    fn daylight_saving_changes_neither_skip_nor_repeat_a_night() {
        let Ok(berlin) = TimeZone::get("Europe/Berlin") else {
            panic!("the time zone database (tzdata) is missing");
        };
        let s = Schedule::parse(file(Some(&["02:30"]), None, None)).unwrap();
        // 2026-03-29: 02:00 -> 03:00 in Berlin; 02:30 does not exist and fires at 03:30 CEST.
        assert_eq!(s.next_after(ts("2026-03-28T12:00:00Z"), &berlin), Some(ts("2026-03-29T01:30:00Z")));
        // 2026-10-25: 03:00 -> 02:00; 02:30 happens twice and fires once, at the first (CEST).
        let first = s.next_after(ts("2026-10-24T12:00:00Z"), &berlin).unwrap();
        assert_eq!(first, ts("2026-10-25T00:30:00Z"));
        assert_eq!(s.next_after(first, &berlin), Some(ts("2026-10-26T01:30:00Z")));
    }

    #[test]
    fn bad_schedules_are_refused_by_name() {
        let refused = |f: ScheduleFile, what: &str| {
            let e = Schedule::parse(f).unwrap_err();
            assert!(e.contains(what), "{e} should mention {what}");
        };
        refused(file(None, None, None), "either at");
        refused(file(Some(&["02:00"]), Some("1h"), None), "either at");
        for t in ["2:00", "24:00", "12:60", "12:00:60", "noon", "12:00:00:00", ""] {
            refused(file(Some(&[t]), None, None), "not a time of day");
        }
        for e in ["4s", "0m", "2d", "25h", "1w", "h", "-1h", "99999999999d"] {
            refused(file(None, Some(e), None), "every");
        }
        refused(file(Some(&["02:00"]), None, Some(&["funday"])), "not a day");
        refused(file(Some(&["02:00"]), None, Some(&[])), "days is empty");
        let mut f = file(Some(&["02:00"]), None, None);
        f.vms = vec!["*".into(), "vm1".into()];
        refused(f, "stands alone");
        let mut f = file(Some(&["02:00"]), None, None);
        f.vms = vec!["../etc".into()];
        refused(f, "VM name");
        let mut f = file(Some(&["02:00"]), None, None);
        f.parallel = Some(0);
        refused(f, "parallel");
        let mut f = file(Some(&["02:00"]), None, None);
        f.name = "a b".into();
        refused(f, "schedule name");
        let mut f = file(Some(&["02:00"]), None, None);
        f.exclude = vec!["vm2".into()];
        refused(f, "exclude goes with");
        let mut f = file(Some(&["02:00"]), None, None);
        f.kind = Some(Work::Replication);
        f.tags = vec!["t".into()];
        refused(f, "replication schedule takes no");
        let wrap = Schedule::parse(file(Some(&["02:00"]), None, Some(&["fri-mon", "Wed"]))).unwrap();
        assert_eq!(wrap.days, [true, false, true, false, true, true, true]);
    }

    #[test]
    fn the_config_reads_every_key() {
        let f: ScheduleFile = toml::from_str(
            "name = \"nightly\"\nvms = [\"*\"]\nat = [\"02:00\"]\ndays = [\"sat\"]\nbackup_type = \"full\"\n\
             node = \"esx-a\"\ntags = [\"weekly\"]\nparallel = 2\n",
        )
        .unwrap();
        let s = Schedule::parse(f).unwrap();
        assert_eq!((s.vms, s.backup_type, s.parallel), (Vms::All { except: vec![] }, BackupType::Full, 2));
        let f: ScheduleFile = toml::from_str(
            "name = \"dr\"\nvms = [\"*\"]\nexclude = [\"test1\", \"test1\"]\nevery = \"15m\"\nkind = \"replication\"\n",
        )
        .unwrap();
        let s = Schedule::parse(f).unwrap();
        assert_eq!((s.vms, s.work), (Vms::All { except: vec!["test1".into()] }, Work::Replication));
        assert!(
            toml::from_str::<ScheduleFile>("name = \"x\"\nvms = [\"a\"]\nevery = \"1h\"\nkind = \"verify\"\n").is_err()
        );
        assert!(toml::from_str::<ScheduleFile>("name = \"x\"\nvms = [\"a\"]\nevery = \"1h\"\ncron = \"*\"\n").is_err());
    }

    #[test]
    fn a_backup_schedule_backs_up_the_vms_it_names_or_every_vm_but_those_it_excludes() {
        let parsed = |text: &str| Schedule::parse(toml::from_str(text).unwrap()).unwrap();
        let named = parsed("name = \"n\"\nvms = [\"db\"]\nat = [\"02:00\"]\n");
        assert!(named.backs_up("db", "a") && named.backs_up("db", "b") && !named.backs_up("web", "a"));
        let all = parsed("name = \"n\"\nvms = [\"*\"]\nexclude = [\"test\"]\nnode = \"a\"\nevery = \"1h\"\n");
        assert!(all.backs_up("web", "a") && !all.backs_up("test", "a") && !all.backs_up("web", "b"));
        assert!(all.excludes("test", "a") && !all.excludes("test", "b") && !all.excludes("web", "a"));
        assert!(!named.excludes("web", "a"), "not named is not excluded");
        let replicas = parsed("name = \"n\"\nvms = [\"db\"]\nevery = \"1h\"\nkind = \"replication\"\n");
        assert!(!replicas.backs_up("db", "a"), "a replica is not a backup");
    }

    #[test]
    fn a_schedule_takes_retention_of_its_own_checked_as_the_hubs() {
        let mut f = file(Some(&["02:00"]), None, None);
        assert!(Schedule::parse(f.clone()).unwrap().retention.is_empty(), "none given: the hub's");
        f.keep_backups = Some(3);
        f.keep_daily = Some(7);
        let s = Schedule::parse(f.clone()).unwrap();
        assert_eq!((s.retention.last, s.retention.daily, s.retention.weekly), (Some(3), Some(7), None));
        f.keep_weekly = Some(0);
        let e = Schedule::parse(f.clone()).unwrap_err();
        assert!(e.contains("schedule s: keep_weekly must be at least 1"), "{e}");
        f.keep_weekly = None;
        f.kind = Some(Work::Replication);
        let e = Schedule::parse(f).unwrap_err();
        assert!(e.contains("a replication schedule takes no keep_*"), "{e}");
    }
}
