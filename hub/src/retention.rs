//! Which backups a retention policy keeps: the last N, and the newest of each of the last N
//! hours, days, ISO weeks, months and years ("grandfather-father-son").
//!
//! A pure function over `(backup_id, created_at)` pairs, tested without I/O; the hub applies its
//! verdicts by deleting (merging away, `jobs/merge.rs`) the backups it does not keep. The
//! semantics are Proxmox Backup Server's `prune`, which backup operators know: the backups are
//! walked newest first, once per rule, in the order last, hourly, daily, weekly, monthly, yearly.
//! A rule keeps the newest backup of each period (an hour, a day, ...) until it has kept N, and
//! skips a period in which an earlier rule already kept a backup (so `keep_last = 3, keep_daily =
//! 7` keeps three backups and the newest of seven *other* days). What no rule keeps is removed.
//! Every rule that is set keeps the newest backup, so a policy never removes the VM's latest
//! point in time; a policy with no rule keeps everything.
//!
//! Periods are those of the hub's time zone (`TZ`, else `/etc/localtime`, as `date` shows it),
//! so "daily" means the operator's days; ISO weeks start on Monday. A backup whose creation time
//! cannot be read (a hand-edited manifest) is kept: nothing is deleted that cannot be dated.

use std::collections::HashSet;

use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};
use serde::{Deserialize, Serialize};

/// How many backups (or periods) each rule keeps; a rule left `None` keeps nothing by itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The newest N backups (`keep_backups` in the config, `keep` in requests).
    #[serde(rename = "keep", skip_serializing_if = "Option::is_none")]
    pub last: Option<u32>,
    /// The newest backup of each of the last N hours that have one.
    #[serde(rename = "keep_hourly", skip_serializing_if = "Option::is_none")]
    pub hourly: Option<u32>,
    /// ... of each of the last N days.
    #[serde(rename = "keep_daily", skip_serializing_if = "Option::is_none")]
    pub daily: Option<u32>,
    /// ... of each of the last N ISO weeks.
    #[serde(rename = "keep_weekly", skip_serializing_if = "Option::is_none")]
    pub weekly: Option<u32>,
    /// ... of each of the last N months.
    #[serde(rename = "keep_monthly", skip_serializing_if = "Option::is_none")]
    pub monthly: Option<u32>,
    /// ... of each of the last N years.
    #[serde(rename = "keep_yearly", skip_serializing_if = "Option::is_none")]
    pub yearly: Option<u32>,
}

/// A rule of a [`Policy`], the reason a backup is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Rule {
    /// `keep` / `keep_backups`.
    #[serde(rename = "keep-last")]
    Last,
    /// `keep_hourly`.
    #[serde(rename = "keep-hourly")]
    Hourly,
    /// `keep_daily`.
    #[serde(rename = "keep-daily")]
    Daily,
    /// `keep_weekly`.
    #[serde(rename = "keep-weekly")]
    Weekly,
    /// `keep_monthly`.
    #[serde(rename = "keep-monthly")]
    Monthly,
    /// `keep_yearly`.
    #[serde(rename = "keep-yearly")]
    Yearly,
    /// Kept whatever the policy: its creation time could not be read.
    #[serde(rename = "undated")]
    Undated,
    /// Kept whatever the policy: another retention keeps it (a `[[schedule]]`'s own `keep_*` for
    /// the backups it made, or the hub's for the others; `jobs/prune.rs`).
    #[serde(rename = "other-retention")]
    OtherRetention,
}

impl Rule {
    /// The rules in the order they are applied.
    const ORDER: [Rule; 6] = [Rule::Last, Rule::Hourly, Rule::Daily, Rule::Weekly, Rule::Monthly, Rule::Yearly];

    /// The key of the period `at` falls in (every backup its own period for `Last`).
    fn period(self, at: &Zoned, index: usize) -> (i32, i32, i32) {
        match self {
            Rule::Last | Rule::Undated | Rule::OtherRetention => {
                (i32::MIN, i32::MIN, i32::try_from(index).unwrap_or(i32::MAX))
            }
            Rule::Hourly => (i32::from(at.year()), i32::from(at.day_of_year()), i32::from(at.hour())),
            Rule::Daily => (i32::from(at.year()), i32::from(at.day_of_year()), 0),
            Rule::Weekly => {
                let week = at.date().iso_week_date();
                (i32::from(week.year()), i32::from(week.week()), 0)
            }
            Rule::Monthly => (i32::from(at.year()), i32::from(at.month()), 0),
            Rule::Yearly => (i32::from(at.year()), 0, 0),
        }
    }
}

/// One backup as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Point<'a> {
    /// Its id.
    pub backup_id: &'a str,
    /// When it was made (RFC 3339, as in its manifest).
    pub created_at: &'a str,
}

/// What the policy says of one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// The backup.
    pub backup_id: String,
    /// When it was made.
    pub created_at: String,
    /// The rule that keeps it; `None`: removed.
    pub kept_by: Option<Rule>,
}

impl Policy {
    /// Whether no rule is set (then every backup is kept, and nothing is applied).
    pub fn is_empty(&self) -> bool {
        self.counts().iter().all(|(_, n)| n.is_none())
    }

    /// The policy of a config file's keys `keep_backups`, `keep_hourly`, `keep_daily`,
    /// `keep_weekly`, `keep_monthly` and `keep_yearly`, in that order (hub.toml's top level, a
    /// `[[schedule]]`), checked.
    ///
    /// # Errors
    /// A rule of 0, named by its key.
    pub fn from_keys(keys: [Option<u32>; 6]) -> Result<Self, String> {
        let [last, hourly, daily, weekly, monthly, yearly] = keys;
        let policy = Self { last, hourly, daily, weekly, monthly, yearly };
        policy.validate("keep_backups")?;
        Ok(policy)
    }

    /// A policy whose rules are all at least 1.
    ///
    /// # Errors
    /// A rule of 0, named with the key it was given as (`keep_daily`, ...; `last_key` for the
    /// last-N rule, which configs and requests name differently).
    pub fn validate(&self, last_key: &str) -> Result<(), String> {
        for (rule, n) in self.counts() {
            if n == Some(0) {
                let key = match rule {
                    Rule::Last => last_key.to_string(),
                    other => format!("keep_{}", other.period_name()),
                };
                return Err(format!("{key} must be at least 1 (or left out)"));
            }
        }
        Ok(())
    }

    fn counts(&self) -> [(Rule, Option<u32>); 6] {
        [
            (Rule::Last, self.last),
            (Rule::Hourly, self.hourly),
            (Rule::Daily, self.daily),
            (Rule::Weekly, self.weekly),
            (Rule::Monthly, self.monthly),
            (Rule::Yearly, self.yearly),
        ]
    }

    /// The verdict on each of `backups` (any order), newest first, periods in `tz`. An empty
    /// policy keeps every backup (`kept_by` `Last`).
    pub fn select(&self, backups: &[Point<'_>], tz: &TimeZone) -> Vec<Verdict> {
        let mut dated: Vec<(Option<Zoned>, &Point<'_>)> = backups
            .iter()
            .map(|p| (p.created_at.parse::<Timestamp>().ok().map(|t| t.to_zoned(tz.clone())), p))
            .collect();
        // Newest first; equal times by id, so the verdicts never depend on the input's order.
        dated.sort_by(|(a, pa), (b, pb)| {
            let (ta, tb) = (a.as_ref().map(Zoned::timestamp), b.as_ref().map(Zoned::timestamp));
            tb.cmp(&ta).then_with(|| pb.backup_id.cmp(pa.backup_id))
        });
        let keep_all = self.is_empty().then_some(Rule::Last);
        let mut kept: Vec<Option<Rule>> =
            dated.iter().map(|(at, _)| if at.is_none() { Some(Rule::Undated) } else { keep_all }).collect();
        let counts = self.counts();
        for rule in Rule::ORDER {
            let Some(limit) = counts.iter().find(|(r, _)| *r == rule).and_then(|(_, n)| *n) else { continue };
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            // Periods in which an earlier rule already kept a backup.
            let covered: HashSet<_> = dated
                .iter()
                .zip(&kept)
                .enumerate()
                .filter_map(|(i, ((at, _), k))| at.as_ref().filter(|_| k.is_some()).map(|at| rule.period(at, i)))
                .collect();
            let mut taken = HashSet::new();
            for (i, (at, _)) in dated.iter().enumerate() {
                if taken.len() >= limit {
                    break;
                }
                let (Some(at), None) = (at, kept.get(i).copied().flatten()) else { continue };
                let period = rule.period(at, i);
                if !covered.contains(&period) && taken.insert(period) {
                    if let Some(slot) = kept.get_mut(i) {
                        *slot = Some(rule);
                    }
                }
            }
        }
        dated
            .iter()
            .zip(kept)
            .map(|((_, p), kept_by)| Verdict {
                backup_id: p.backup_id.to_string(),
                created_at: p.created_at.to_string(),
                kept_by,
            })
            .collect()
    }
}

impl Rule {
    fn period_name(self) -> &'static str {
        match self {
            Rule::Last => "last",
            Rule::Hourly => "hourly",
            Rule::Daily => "daily",
            Rule::Weekly => "weekly",
            Rule::Monthly => "monthly",
            Rule::Yearly => "yearly",
            Rule::Undated => "undated",
            Rule::OtherRetention => "other-retention",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(times: &[String]) -> Vec<Point<'_>> {
        times.iter().map(|t| Point { backup_id: t, created_at: t }).collect()
    }

    /// The ids kept, newest first.
    fn kept(policy: Policy, times: &[String]) -> Vec<String> {
        policy
            .select(&points(times), &TimeZone::UTC)
            .into_iter()
            .filter(|v| v.kept_by.is_some())
            .map(|v| v.backup_id)
            .collect()
    }

    /// One backup a day at 22:00 UTC for `days` days from 2026-01-01 (a Thursday).
    fn daily(days: i64) -> Vec<String> {
        let start: Timestamp = "2026-01-01T22:00:00Z".parse().unwrap();
        (0..days).map(|d| start.checked_add(jiff::SignedDuration::from_hours(24 * d)).unwrap().to_string()).collect()
    }

    #[test]
    fn an_empty_policy_keeps_everything() {
        let times = daily(5);
        assert!(Policy::default().is_empty());
        assert_eq!(kept(Policy::default(), &times).len(), 5);
    }

    #[test]
    fn keep_last_keeps_the_newest_n() {
        let times = daily(10);
        let policy = Policy { last: Some(3), ..Policy::default() };
        let verdicts = policy.select(&points(&times), &TimeZone::UTC);
        assert_eq!(verdicts.iter().filter(|v| v.kept_by == Some(Rule::Last)).count(), 3);
        assert_eq!(verdicts.first().map(|v| v.backup_id.as_str()), Some("2026-01-10T22:00:00Z"));
        assert_eq!(kept(policy, &times), ["2026-01-10T22:00:00Z", "2026-01-09T22:00:00Z", "2026-01-08T22:00:00Z"]);
    }

    #[test]
    fn keep_daily_keeps_the_newest_backup_of_each_day() {
        // Three backups a day: 06:00, 12:00 and 18:00 UTC, for four days.
        let times: Vec<String> =
            (1..=4).flat_map(|d| [6, 12, 18].map(|h| format!("2026-03-{d:02}T{h:02}:00:00Z"))).collect();
        let policy = Policy { daily: Some(3), ..Policy::default() };
        assert_eq!(kept(policy, &times), ["2026-03-04T18:00:00Z", "2026-03-03T18:00:00Z", "2026-03-02T18:00:00Z"]);
    }

    #[test]
    fn a_later_rule_skips_the_periods_an_earlier_one_covers() {
        // keep_last 2 keeps the two newest days' backups; daily 2 then takes two *other* days.
        let times = daily(10);
        let policy = Policy { last: Some(2), daily: Some(2), ..Policy::default() };
        let verdicts = policy.select(&points(&times), &TimeZone::UTC);
        let reasons: Vec<Option<Rule>> = verdicts.iter().map(|v| v.kept_by).take(5).collect();
        assert_eq!(reasons, [Some(Rule::Last), Some(Rule::Last), Some(Rule::Daily), Some(Rule::Daily), None]);
    }

    #[test]
    fn grandfather_father_son_over_two_years_of_daily_backups() {
        // 2026-01-01 .. 2027-12-31, one a day at 22:00 UTC: 730 backups.
        let times = daily(730);
        let policy =
            Policy { last: Some(3), daily: Some(7), weekly: Some(4), monthly: Some(6), yearly: Some(2), hourly: None };
        let verdicts = policy.select(&points(&times), &TimeZone::UTC);
        let by = |rule| {
            verdicts.iter().filter(|v| v.kept_by == Some(rule)).map(|v| v.backup_id.as_str()).collect::<Vec<_>>()
        };
        assert_eq!(by(Rule::Last), ["2027-12-31T22:00:00Z", "2027-12-30T22:00:00Z", "2027-12-29T22:00:00Z"]);
        assert_eq!(by(Rule::Daily).len(), 7);
        assert_eq!(by(Rule::Daily).last(), Some(&"2027-12-22T22:00:00Z"));
        // 2027-12-22 is a Wednesday of ISO week 51; weeks 52 and 51 are covered, so the weekly
        // rule keeps the Sundays closing weeks 50, 49, 48 and 47.
        assert_eq!(
            by(Rule::Weekly),
            ["2027-12-19T22:00:00Z", "2027-12-12T22:00:00Z", "2027-12-05T22:00:00Z", "2027-11-28T22:00:00Z"]
        );
        // December and November 2027 are covered: month ends from October back.
        assert_eq!(
            by(Rule::Monthly),
            [
                "2027-10-31T22:00:00Z",
                "2027-09-30T22:00:00Z",
                "2027-08-31T22:00:00Z",
                "2027-07-31T22:00:00Z",
                "2027-06-30T22:00:00Z",
                "2027-05-31T22:00:00Z"
            ]
        );
        // 2027 is covered: the last backup of 2026; there is no third year.
        assert_eq!(by(Rule::Yearly), ["2026-12-31T22:00:00Z"]);
        assert_eq!(verdicts.iter().filter(|v| v.kept_by.is_some()).count(), 3 + 7 + 4 + 6 + 1);
    }

    #[test]
    fn periods_are_those_of_the_time_zone() {
        // 22:00 and 23:30 UTC on 1 March are 2 March in Tokyo, 06:00 UTC the same day there.
        let times: Vec<String> =
            ["2026-03-01T22:00:00Z", "2026-03-01T23:30:00Z", "2026-03-02T06:00:00Z"].map(String::from).to_vec();
        let policy = Policy { daily: Some(5), ..Policy::default() };
        assert_eq!(kept(policy, &times), ["2026-03-02T06:00:00Z", "2026-03-01T23:30:00Z"]);
        let tokyo = TimeZone::fixed(jiff::tz::offset(9));
        let in_tokyo: Vec<String> = policy
            .select(&points(&times), &tokyo)
            .into_iter()
            .filter(|v| v.kept_by.is_some())
            .map(|v| v.backup_id)
            .collect();
        assert_eq!(in_tokyo, ["2026-03-02T06:00:00Z"]);
    }

    #[test]
    fn iso_weeks_cross_the_new_year() {
        // 2026-12-28 (Monday) .. 2027-01-03 (Sunday) are all ISO week 53 of 2026.
        let times: Vec<String> =
            ["2026-12-27T12:00:00Z", "2026-12-28T12:00:00Z", "2027-01-03T12:00:00Z"].map(String::from).to_vec();
        let policy = Policy { weekly: Some(5), ..Policy::default() };
        assert_eq!(kept(policy, &times), ["2027-01-03T12:00:00Z", "2026-12-27T12:00:00Z"]);
    }

    #[test]
    fn an_undated_backup_is_kept_and_the_order_of_input_does_not_matter() {
        let mut times = daily(4);
        times.push("not a time".into());
        let policy = Policy { last: Some(1), ..Policy::default() };
        let forward = policy.select(&points(&times), &TimeZone::UTC);
        times.reverse();
        assert_eq!(policy.select(&points(&times), &TimeZone::UTC), forward);
        let undated = forward.iter().find(|v| v.backup_id == "not a time").map(|v| v.kept_by);
        assert_eq!(undated, Some(Some(Rule::Undated)));
        assert_eq!(forward.iter().filter(|v| v.kept_by.is_some()).count(), 2);
    }

    #[test]
    fn every_rule_keeps_the_newest_backup() {
        let times = daily(40);
        for policy in [
            Policy { hourly: Some(1), ..Policy::default() },
            Policy { daily: Some(1), ..Policy::default() },
            Policy { weekly: Some(1), ..Policy::default() },
            Policy { monthly: Some(1), ..Policy::default() },
            Policy { yearly: Some(1), ..Policy::default() },
        ] {
            assert_eq!(kept(policy, &times), ["2026-02-09T22:00:00Z"], "{policy:?}");
        }
    }

    #[test]
    fn a_rule_of_zero_is_refused_by_its_key() {
        assert_eq!(Policy { daily: Some(1), ..Policy::default() }.validate("keep"), Ok(()));
        let zero_daily = Policy { daily: Some(0), ..Policy::default() }.validate("keep");
        assert!(zero_daily.is_err_and(|e| e.starts_with("keep_daily ")));
        let zero_last = Policy { last: Some(0), ..Policy::default() }.validate("keep_backups");
        assert!(zero_last.is_err_and(|e| e.starts_with("keep_backups ")));
    }
}
