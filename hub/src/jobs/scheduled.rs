//! Schedules at work (`[[schedule]]`, checked in `crate::schedule`): at each occurrence the VMs
//! of a schedule are backed up, `parallel` at a time, each as `POST /api/v1/backups` would
//! (each backup naming the schedule; the schedule's `keep_*` applied after each to the backups it
//! made, else the config's retention to the others), or their replicas brought up to date as `POST
//! /api/v1/replications` would (`kind = "replication"`), and the run is kept for the API (`GET
//! /api/v1/schedules`: the next occurrence, the run under way, the last run with each VM's
//! backup and outcome) and the metrics.
//!
//! What an operator of a backup service expects of its scheduler, and why it is built so:
//! - A run is not started twice: an occurrence that comes while the schedule's previous run is
//!   still going is skipped (logged, counted as `skipped_occurrences`), as is a VM that already
//!   has a job (its backup is under way: `skipped` with the reason). Runs of one schedule take a
//!   lock; `POST /api/v1/schedules/NAME/run` takes the same one (409 while a run goes on). Two
//!   nodes' VMs of one name in a run (the hub runs one job per VM name) go one after the other:
//!   the later waits for the earlier without holding a turn, and is not skipped.
//! - A missed night is caught up: the last occurrence handled (its run ended, or it was skipped)
//!   is kept in the repository (`.schedules.json`); a hub started after an occurrence it did not
//!   handle (it was down, or killed mid-run) runs the schedule once at start, not once per missed
//!   occurrence. A schedule new to the hub starts from its next occurrence. A run a graceful stop
//!   cut short goes on at the next start instead (`handover.rs`): what it had done is kept, its
//!   VMs' backups under way are taken up and followed, the rest are backed up.
//! - A node out of reach for a moment (its tunnel reconnecting) or ports all leased does not
//!   lose the night: a start that fails as unavailable (503), and the listing of a node's VMs for
//!   `vms = ["*"]`, are tried again every [`RETRY_EVERY`] for up to [`RETRY_FOR`]. Other refusals
//!   are recorded as they are; a node whose VMs could not be listed is in the run's `errors` and
//!   counted in the metrics.
//! - Sleeping is done in steps of at most a minute against the wall clock, so a clock set by NTP
//!   or a suspended machine does not shift a run by the difference.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, OwnedMutexGuard, Semaphore};
use tokio_util::sync::CancellationToken;

use super::files::off_runtime;
use super::view::type_name;
use super::{Asked, Hub, Kind, Status};
use crate::error::HubError;
use crate::repo;
use crate::retention::Policy;
use crate::schedule::{Schedule, Vms, Work};

/// How often a start refused as unavailable is tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(15);
/// How long it is tried.
pub const RETRY_FOR: Duration = Duration::from_secs(300);
/// How often a scheduled backup's job is looked at.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);
/// The longest single sleep before the wall clock is read again.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// Its occurrence came.
    Schedule,
    /// At start, for an occurrence the hub missed.
    CatchUp,
    /// `POST /api/v1/schedules/NAME/run`.
    Api,
}

/// Where one VM of a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Not started yet (waiting for its turn, or for its node or a port).
    Waiting,
    /// Its backup is being made.
    Running,
    /// Its backup completed.
    Completed,
    /// Its backup failed, or could not be started.
    Failed,
    /// Its backup was cancelled.
    Cancelled,
    /// Not backed up by this run: it had a job already.
    Skipped,
}

impl Outcome {
    /// As the API writes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Skipped => "skipped",
        }
    }
}

/// One VM of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduledBackup {
    /// VM.
    pub vm_name: String,
    /// Node (where the schedule or the inventory says).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The backup, once started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// The replication run, once started (`kind = "replication"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication_id: Option<String>,
    /// Where it stands.
    pub status: Outcome,
    /// Why it failed or was skipped (or, while waiting, why it is not started yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One run of a schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleRun {
    /// The occurrence it is for (none when asked for through the API).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub occurrence: Option<String>,
    /// What started it.
    pub trigger: Trigger,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339, once every VM's backup ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// Its VMs.
    pub backups: Vec<ScheduledBackup>,
    /// A node whose VMs could not be listed (with `vms = ["*"]`), and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl ScheduleRun {
    /// How many of its VMs ended in `outcome`.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.backups.iter().filter(|b| b.status == outcome).count()
    }
}

/// A schedule as `GET /api/v1/schedules` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleView {
    /// Name.
    pub name: String,
    /// `backup` or `replication`.
    pub kind: &'static str,
    /// VM names, or `["*"]`.
    pub vms: Vec<String>,
    /// With `["*"]`: VMs left out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// `at 02:00 on mon,...` or `every 6h`.
    pub when: String,
    /// `full` or `incremental`.
    pub backup_type: &'static str,
    /// Only this node's VMs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Tags of its backups.
    pub tags: Vec<String>,
    /// Backups at once.
    pub parallel: usize,
    /// The retention its backups apply (`keep`, `keep_daily`, ...); absent: the hub's.
    #[serde(skip_serializing_if = "Policy::is_empty")]
    pub retention: Policy,
    /// The next occurrence (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_run: Option<String>,
    /// The run under way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<ScheduleRun>,
    /// The last run that ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_run: Option<ScheduleRun>,
    /// Occurrences passed over because the previous run was still going.
    pub skipped_occurrences: u64,
}

/// What the hub keeps of a schedule while it serves.
#[derive(Debug, Default)]
pub(super) struct ScheduleState {
    next_run: Option<Timestamp>,
    running: Option<ScheduleRun>,
    last_run: Option<ScheduleRun>,
    skipped_occurrences: u64,
}

impl ScheduleState {
    /// Its run under way, if any (what a graceful stop hands over, `handover.rs`).
    pub(super) fn run_under_way(&self) -> Option<&ScheduleRun> {
        self.running.as_ref()
    }

    /// No run of it goes on.
    pub(super) fn is_idle(&self) -> bool {
        self.running.is_none()
    }
}

impl Hub {
    /// Run every configured schedule until the hub shuts down (one task each); an occurrence
    /// missed while the hub was down is run at once.
    pub fn start_schedules(self: &Arc<Self>) {
        for s in &self.live().schedules {
            self.start_schedule(Arc::clone(s), true);
        }
    }

    /// Run `schedule` until the hub shuts down or a reload stops it (`catch_up`: at start, run an
    /// occurrence missed while the hub was down).
    pub(super) fn start_schedule(self: &Arc<Self>, schedule: Arc<Schedule>, catch_up: bool) {
        let stop = self.shutdown.child_token();
        let old = self.schedule_stops().insert(schedule.name.clone(), stop.clone());
        if let Some(old) = old {
            old.cancel();
        }
        // Shown at once (the loop sets it too): the API may answer before the loop first runs.
        let next = schedule.next_after(Timestamp::now(), &TimeZone::system());
        self.state().schedules.entry(schedule.name.clone()).or_default().next_run = next;
        let hub = Arc::clone(self);
        tokio::spawn(async move { hub.schedule_loop(schedule, stop, catch_up).await });
    }

    /// Stop schedule `name`'s loop (a run of it under way goes on to its end).
    pub(super) fn stop_schedule(&self, name: &str) {
        if let Some(stop) = self.schedule_stops().remove(name) {
            stop.cancel();
        }
    }

    fn schedule_stops(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.schedule_stops.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The configured schedules, their next occurrences and runs.
    pub fn schedules(&self) -> Vec<ScheduleView> {
        self.live().schedules.iter().filter_map(|s| self.schedule_view(&s.name)).collect()
    }

    /// One schedule's view.
    pub fn schedule_view(&self, name: &str) -> Option<ScheduleView> {
        let live = self.live();
        let s = live.schedules.iter().find(|s| s.name == name)?;
        let st = self.state();
        let state = st.schedules.get(name);
        Some(ScheduleView {
            name: s.name.clone(),
            kind: s.work.name(),
            vms: match &s.vms {
                Vms::All { .. } => vec!["*".into()],
                Vms::Named(names) => names.clone(),
            },
            exclude: match &s.vms {
                Vms::All { except } => except.clone(),
                Vms::Named(_) => Vec::new(),
            },
            when: s.describe(),
            backup_type: type_name(s.backup_type),
            node: s.node.clone(),
            tags: s.tags.clone(),
            parallel: s.parallel,
            retention: s.retention,
            next_run: state.and_then(|x| x.next_run).map(|t| t.to_string()),
            running: state.and_then(|x| x.running.clone()),
            last_run: state.and_then(|x| x.last_run.clone()),
            skipped_occurrences: state.map_or(0, |x| x.skipped_occurrences),
        })
    }

    /// Start a run of schedule `name` now (`POST /api/v1/schedules/NAME/run`); it goes on in
    /// the background.
    ///
    /// # Errors
    /// No such schedule (404), or a run of it is under way (409).
    pub fn run_schedule_now(self: &Arc<Self>, name: &str) -> Result<ScheduleView, HubError> {
        let schedule = self
            .live()
            .schedules
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| HubError::NotFound(format!("no schedule named {name}")))?;
        let guard = self.schedule_lock(name)?;
        // Shown as running before the answer, so that a caller polling at once sees it.
        self.begin_run(name, None, Trigger::Api);
        let hub = Arc::clone(self);
        tokio::spawn(async move { hub.run(&schedule, None, Trigger::Api, guard, &[]).await });
        self.schedule_view(name).ok_or_else(|| HubError::Internal(format!("schedule {name} vanished")))
    }

    /// The run lock of schedule `name` (one per name, kept across reloads), taken.
    fn schedule_lock(&self, name: &str) -> Result<OwnedMutexGuard<()>, HubError> {
        let lock = {
            let mut locks = self.schedule_locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(locks.entry(name.to_string()).or_default())
        };
        lock.try_lock_owned().map_err(|_| HubError::Conflict(format!("a run of schedule {name} is under way")))
    }

    async fn schedule_loop(self: Arc<Self>, schedule: Arc<Schedule>, stop: CancellationToken, catch_up: bool) {
        let s = &*schedule;
        let tz = TimeZone::system();
        let now = Timestamp::now();
        self.state().schedules.entry(s.name.clone()).or_default().next_run = s.next_after(now, &tz);
        // A run of it a graceful stop cut short (`handover.rs`) goes on first: the VMs it had
        // done are not backed up again, those under way are followed, the rest are backed up.
        let handed = catch_up.then(|| self.state().handed_runs.remove(&s.name)).flatten();
        if let Some(prior) = handed {
            if let Ok(guard) = self.schedule_lock(&s.name) {
                let occurrence = prior.occurrence.as_deref().and_then(|o| o.parse::<Timestamp>().ok());
                tracing::info!(schedule = %s.name, started_at = %prior.started_at, "schedule: going on with the run the hub's restart cut short");
                let (carried, trigger) = (prior.backups.clone(), prior.trigger);
                self.state().schedules.entry(s.name.clone()).or_default().running =
                    Some(ScheduleRun { ended_at: None, backups: Vec::new(), errors: Vec::new(), ..prior });
                self.run(&schedule, occurrence, trigger, guard, &carried).await;
            }
        }
        let marks = self.schedule_marks().await;
        match (marks.get(&s.name), s.last_at_or_before(now, &tz)) {
            (Some(handled), Some(missed)) if catch_up && *handled < missed => {
                tracing::warn!(schedule = %s.name, occurrence = %missed, "schedule: an occurrence was missed while the hub was down: running it now");
                if let Ok(guard) = self.schedule_lock(&s.name) {
                    self.begin_run(&s.name, Some(missed), Trigger::CatchUp);
                    self.run(&schedule, Some(missed), Trigger::CatchUp, guard, &[]).await;
                }
            }
            // New to the hub (or changed by a reload): from its next occurrence on.
            (_, Some(last)) if !catch_up || !marks.contains_key(&s.name) => self.mark_handled(&s.name, last).await,
            _ => {}
        }
        let mut after = now;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let now = Timestamp::now();
            let passed = passed_over(s, after, now, &tz);
            if passed > 0 {
                tracing::warn!(schedule = %s.name, occurrences = passed, "schedule: occurrences passed over while its previous run went on");
                self.state().schedules.entry(s.name.clone()).or_default().skipped_occurrences += passed;
            }
            let Some(next) = s.next_after(now, &tz) else {
                tracing::warn!(schedule = %s.name, "schedule: no next occurrence");
                return;
            };
            self.state().schedules.entry(s.name.clone()).or_default().next_run = Some(next);
            loop {
                let left = next.duration_since(Timestamp::now());
                let Ok(left) = Duration::try_from(left) else { break };
                if left.is_zero() {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep(left.min(MAX_SLEEP)) => {}
                    () = stop.cancelled() => return,
                }
            }
            // From now on the view shows the occurrence after this one.
            self.state().schedules.entry(s.name.clone()).or_default().next_run = s.next_after(next, &tz);
            match self.schedule_lock(&s.name) {
                Ok(guard) => {
                    self.begin_run(&s.name, Some(next), Trigger::Schedule);
                    self.run(&schedule, Some(next), Trigger::Schedule, guard, &[]).await;
                }
                Err(_) => {
                    tracing::warn!(schedule = %s.name, occurrence = %next, "schedule: skipped, a run of it (asked for by the API, or before a reload) is still going");
                    self.state().schedules.entry(s.name.clone()).or_default().skipped_occurrences += 1;
                    self.mark_handled(&s.name, next).await;
                }
            }
            after = next;
        }
    }

    /// Record a run as under way (before its VMs are known).
    fn begin_run(&self, name: &str, occurrence: Option<Timestamp>, trigger: Trigger) {
        let run = ScheduleRun {
            occurrence: occurrence.map(|t| t.to_string()),
            trigger,
            started_at: repo::now_rfc3339(),
            ended_at: None,
            backups: Vec::new(),
            errors: Vec::new(),
        };
        self.state().schedules.entry(name.to_string()).or_default().running = Some(run);
    }

    /// One run: the schedule's VMs backed up, `parallel` at a time; then the occurrence marked
    /// handled. `_guard` keeps other runs of the schedule out until this one ends. `carried`: what
    /// this run had done before a restart cut it short; a VM that ended there (completed or
    /// failed) keeps its outcome and is not backed up again.
    async fn run(
        self: &Arc<Self>,
        schedule: &Arc<Schedule>,
        occurrence: Option<Timestamp>,
        trigger: Trigger,
        _guard: OwnedMutexGuard<()>,
        carried: &[ScheduledBackup],
    ) {
        let s = &**schedule;
        let name = s.name.as_str();
        let (targets, errors) = self.scheduled_vms(s).await;
        tracing::info!(schedule = name, ?trigger, vms = targets.len(), "schedule: run started");
        let ended_before = |vm: &str, node: &Option<String>| {
            carried.iter().find(|b| {
                b.vm_name == vm && b.node == *node && matches!(b.status, Outcome::Completed | Outcome::Failed)
            })
        };
        {
            let mut st = self.state();
            if let Some(run) = st.schedules.get_mut(name).and_then(|x| x.running.as_mut()) {
                run.backups = targets
                    .iter()
                    .map(|(vm, node)| {
                        ended_before(vm, node).cloned().unwrap_or_else(|| ScheduledBackup {
                            vm_name: vm.clone(),
                            node: node.clone(),
                            backup_id: None,
                            replication_id: None,
                            status: Outcome::Waiting,
                            error: None,
                        })
                    })
                    .collect();
                run.errors = errors;
            }
        }
        let turns = Arc::new(Semaphore::new(s.parallel));
        let mut backups = tokio::task::JoinSet::new();
        // Each VM name's last backup of this run: ended (its sender dropped) when its task ends.
        let mut last_of_name: HashMap<String, oneshot::Receiver<()>> = HashMap::new();
        // Turns taken in the listed order: VMs start in the order the schedule names them. Two
        // nodes' VMs of one name (`vms = ["*"]`) share the name's one job at a time: the later
        // waits for the earlier to end, holding no turn meanwhile, and then takes its turn.
        for (slot, (vm, node)) in targets.into_iter().enumerate() {
            if ended_before(&vm, &node).is_some() {
                continue;
            }
            let (ended, ended_rx) = oneshot::channel::<()>();
            let after = last_of_name.insert(vm.clone(), ended_rx);
            let turn = match after {
                None => match Arc::clone(&turns).acquire_owned().await {
                    Ok(turn) => Some(turn),
                    Err(_) => break,
                },
                Some(_) => None,
            };
            let (hub, schedule, turns) = (Arc::clone(self), Arc::clone(schedule), Arc::clone(&turns));
            backups.spawn(async move {
                let _ended = ended;
                let _turn = match (turn, after) {
                    (Some(turn), _) => turn,
                    (None, after) => {
                        if let Some(earlier) = after {
                            // An error only says the earlier task is gone, which is what is awaited.
                            let _ = earlier.await;
                        }
                        match turns.acquire_owned().await {
                            Ok(turn) => turn,
                            Err(_) => return,
                        }
                    }
                };
                hub.scheduled_backup(&schedule, slot, &vm, node.as_deref()).await;
            });
        }
        while backups.join_next().await.is_some() {}
        let ended = {
            let mut st = self.state();
            let state = st.schedules.entry(name.to_string()).or_default();
            let mut run = state.running.take();
            if let Some(r) = run.as_mut() {
                r.ended_at = Some(repo::now_rfc3339());
            }
            state.last_run.clone_from(&run);
            run
        };
        if let Some(r) = ended {
            tracing::info!(
                schedule = name,
                completed = r.count(Outcome::Completed),
                failed = r.count(Outcome::Failed),
                skipped = r.count(Outcome::Skipped),
                cancelled = r.count(Outcome::Cancelled),
                "schedule: run ended"
            );
        }
        if let Some(at) = occurrence.filter(|_| !self.shutdown.is_cancelled()) {
            self.mark_handled(name, at).await;
        }
        // A hub killed from now on does not take this run up again.
        self.record_runs_changed().await;
    }

    /// The VMs of a run, each with the node to ask (`None`: wherever the VM is), and the nodes
    /// whose inventory could not be read.
    async fn scheduled_vms(&self, s: &Schedule) -> (Vec<(String, Option<String>)>, Vec<String>) {
        match &s.vms {
            Vms::Named(names) => (names.iter().map(|n| (n.clone(), s.node.clone())).collect(), Vec::new()),
            Vms::All { except } => {
                let mut out = Vec::new();
                let mut errors = Vec::new();
                let give_up = Instant::now() + RETRY_FOR;
                for (spec, client) in self.nodes().iter().filter(|(n, _)| s.node.as_ref().is_none_or(|w| *w == n.name))
                {
                    // A node out of reach (its tunnel reconnecting) is asked again, as a start is.
                    loop {
                        match client.vms().await {
                            Ok(vms) => out.extend(
                                vms.into_iter()
                                    .filter(|v| !except.contains(&v.name))
                                    .map(|v| (v.name, Some(spec.name.clone()))),
                            ),
                            Err(e) if Instant::now() < give_up && !self.shutdown.is_cancelled() => {
                                tracing::info!(schedule = %s.name, node = %spec.name, error = %e, "schedule: cannot list the node's VMs now, trying again");
                                tokio::select! {
                                    () = tokio::time::sleep(RETRY_EVERY) => {}
                                    () = self.shutdown.cancelled() => {}
                                }
                                continue;
                            }
                            Err(e) => {
                                tracing::error!(schedule = %s.name, node = %spec.name, error = %e, "schedule: cannot list the node's VMs");
                                errors.push(format!("node {}: cannot list its VMs: {e}", spec.name));
                            }
                        }
                        break;
                    }
                }
                (out, errors)
            }
        }
    }

    /// Back up (or replicate) one VM of a run and follow its job to the end, recording each step in the run.
    async fn scheduled_backup(self: &Arc<Self>, s: &Schedule, slot: usize, vm: &str, node: Option<&str>) {
        let record = |status: Outcome, id: Option<&str>, error: Option<String>| {
            let mut st = self.state();
            let run = st.schedules.get_mut(&s.name).and_then(|x| x.running.as_mut());
            if let Some(b) = run.and_then(|r| r.backups.get_mut(slot)) {
                b.status = status;
                match (id, s.work) {
                    (Some(id), Work::Backup) => b.backup_id = Some(id.to_string()),
                    (Some(id), Work::Replication) => b.replication_id = Some(id.to_string()),
                    (None, _) => {}
                }
                b.error = error;
            }
        };
        let kind = match s.work {
            Work::Backup => Kind::Backup,
            Work::Replication => Kind::Replication,
        };
        let give_up = Instant::now() + RETRY_FOR;
        let id = loop {
            if self.shutdown.is_cancelled() {
                return record(Outcome::Cancelled, None, Some("the hub is shutting down".into()));
            }
            let busy = self.state().busy_vms.get(vm).cloned();
            // A run the last stop cut short: the VM's job it started was taken up, and is followed.
            if let Some(taken) = busy.as_ref().filter(|b| self.was_taken_up(b) && self.get(kind, b).is_some()) {
                tracing::info!(schedule = %s.name, vm, job = %taken, "schedule: following the VM's job taken up after the restart");
                break taken.clone();
            }
            if let Some(other) = busy {
                let why = format!("VM {vm} already has job {other} running");
                tracing::warn!(schedule = %s.name, vm, error = %why, "schedule: VM skipped");
                return record(Outcome::Skipped, None, Some(why));
            }
            // The schedule's keep_* (empty: the hub's), as a request's keep rules are.
            match self
                .start(
                    kind,
                    vm,
                    s.backup_type,
                    node,
                    Asked { tags: &s.tags, retention: s.retention, schedule: Some(&s.name) },
                )
                .await
            {
                Ok(job) => break job.id,
                Err(HubError::Unavailable(e)) if Instant::now() < give_up => {
                    tracing::info!(schedule = %s.name, vm, error = %e, "schedule: cannot start now, trying again");
                    record(Outcome::Waiting, None, Some(format!("{e} (trying again)")));
                    tokio::select! {
                        () = tokio::time::sleep(RETRY_EVERY) => {}
                        () = self.shutdown.cancelled() => {}
                    }
                }
                Err(e) => {
                    tracing::error!(schedule = %s.name, vm, error = %e, "schedule: backup not started");
                    return record(Outcome::Failed, None, Some(e.to_string()));
                }
            }
        };
        record(Outcome::Running, Some(&id), None);
        loop {
            let Some(job) = self.get(kind, &id) else {
                return record(Outcome::Failed, None, Some(format!("job {id} is no longer known")));
            };
            if job.status.is_final() {
                let outcome = match job.status {
                    Status::Completed => Outcome::Completed,
                    Status::Cancelled => Outcome::Cancelled,
                    _ => Outcome::Failed,
                };
                return record(outcome, None, job.error);
            }
            tokio::time::sleep(FOLLOW_EVERY).await;
        }
    }

    /// The last occurrence each schedule handled (`.schedules.json` in the repository).
    async fn schedule_marks(&self) -> BTreeMap<String, Timestamp> {
        let repo = self.repo.clone();
        let marks = off_runtime("reading schedule marks", move || repo.schedule_marks()).await.unwrap_or_default();
        marks.into_iter().filter_map(|(name, at)| Some((name, at.parse().ok()?))).collect()
    }

    /// Record `at` as the last occurrence `name` handled (never moving a mark back).
    async fn mark_handled(&self, name: &str, at: Timestamp) {
        let _writing = self.marks_file.lock().await;
        let mut marks = self.schedule_marks().await;
        if marks.get(name).is_some_and(|m| *m >= at) {
            return;
        }
        marks.insert(name.to_string(), at);
        let marks: BTreeMap<String, String> = marks.into_iter().map(|(n, t)| (n, t.to_string())).collect();
        let repo = self.repo.clone();
        match off_runtime("keeping schedule marks", move || repo.save_schedule_marks(&marks)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(schedule = name, error = %e, "cannot keep the schedule's last occurrence"),
            Err(e) => tracing::warn!(schedule = name, error = %e, "cannot keep the schedule's last occurrence"),
        }
    }
}

/// How many occurrences fell after `after` and before `now` (counted up to a thousand: a clock
/// set years ahead is not walked through).
fn passed_over(s: &Schedule, after: Timestamp, now: Timestamp, tz: &TimeZone) -> u64 {
    let mut count = 0;
    let mut at = after;
    while count < 1000 {
        match s.next_after(at, tz) {
            Some(next) if next < now => {
                count += 1;
                at = next;
            }
            _ => break,
        }
    }
    count
}
