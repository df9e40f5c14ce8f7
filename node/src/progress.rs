//! What `sendense-node copy` shows on a terminal: one bar per disk (bytes dealt with, rate,
//! ETA, how much travelled) and a summary table at the end. Without a terminal the bars are
//! hidden and a line per disk every ten seconds takes their place, so a log is never silent.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::mover::{Progress, ProgressSnapshot};

/// Human bytes (binary units).
pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units.get(u).copied().unwrap_or("B"))
    }
}

/// Draw progress until `done` is cancelled.
pub fn spawn_display(disks: Vec<(u32, Arc<Progress>)>, done: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let tty = std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let style = ProgressStyle::with_template("disk {prefix} [{bar:30}] {percent:>3}% {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bars: Vec<(u32, Arc<Progress>, ProgressBar)> = disks
            .into_iter()
            .map(|(k, p)| {
                let bar = multi.add(ProgressBar::new(100));
                bar.set_style(style.clone());
                bar.set_prefix(k.to_string());
                (k, p, bar)
            })
            .collect();
        let mut ticks = 0u64;
        loop {
            let finished = done.is_cancelled();
            for (key, p, bar) in &bars {
                let s = p.snapshot();
                bar.set_length(s.bytes_total.max(1));
                bar.set_position(s.bytes_done);
                bar.set_message(line(&s));
                if !tty && (ticks.is_multiple_of(100) || finished) {
                    eprintln!("disk {key}: {}/{} {}", human(s.bytes_done), human(s.bytes_total), line(&s));
                }
            }
            if finished {
                for (_, _, bar) in &bars {
                    bar.finish();
                }
                return;
            }
            ticks += 1;
            tokio::select! {
                _ = done.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    })
}

fn line(s: &ProgressSnapshot) -> String {
    let eta = s.eta_s.map(|e| format!(" ETA {e}s")).unwrap_or_default();
    format!("{}/s, sent {}{eta}", human(s.rate_bps), human(s.bytes_sent))
}

/// The summary table.
pub fn summary(rows: &[(u32, String, ProgressSnapshot, String)]) -> String {
    let mut out = format!(
        "{:<6} {:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>11}  {}\n",
        "disk", "mode", "size", "sent", "holes", "zeroes", "unchanged", "time", "rate", "result"
    );
    for (key, mode, s, result) in rows {
        out.push_str(&format!(
            "{:<6} {:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>7.1}s {:>9}/s  {}\n",
            key,
            mode,
            human(s.bytes_total),
            human(s.bytes_sent),
            human(s.bytes_skipped_holes),
            human(s.bytes_skipped_zero),
            human(s.bytes_unchanged),
            s.elapsed_s,
            human(s.rate_bps),
            result
        ));
    }
    out
}
