//! Collects measurements per case and repetition and renders medians and per-rep ratios.

use std::collections::BTreeMap;

/// Measurements: (section, case, metric) -> one value per repetition.
#[derive(Debug, Default)]
pub struct Report {
    values: BTreeMap<(String, String, String), Vec<f64>>,
    ratios: Vec<(String, String, String, String)>,
    notes: Vec<String>,
}

pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Two decimals, or three significant digits for ratios far below 1.
fn ratio_text(r: f64) -> String {
    if r.abs() < 0.1 {
        format!("{r:.3e}")
    } else {
        format!("{r:.2}")
    }
}

impl Report {
    pub fn add(&mut self, section: &str, case: &str, metric: &str, value: f64) {
        eprintln!("  {section:<6} {case:<28} {metric:<16} {value:>10.2}");
        self.values.entry((section.into(), case.into(), metric.into())).or_default().push(value);
    }

    /// Report `metric` of case `a` over case `b`, per repetition, as a median ratio.
    /// Throughput and server CPU per GB of one copy of `bytes` that took `secs` and `cpu`
    /// server seconds ([`crate::peers::Running::measure`]).
    pub fn copy(&mut self, section: &str, case: &str, bytes: u64, (secs, cpu): (f64, f64)) {
        self.add(section, case, "MB/s", bytes as f64 / 1e6 / secs);
        self.add(section, case, "srv CPU s/GB", cpu / (bytes as f64 / 1e9));
    }

    pub fn ratio(&mut self, section: &str, a: &str, b: &str, metric: &str) {
        self.ratios.push((section.into(), a.into(), b.into(), metric.into()));
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    pub fn markdown(&self) -> String {
        let mut out =
            String::from("| section | case | metric | median | min | max | n |\n|---|---|---|---|---|---|---|\n");
        for ((section, case, metric), v) in &self.values {
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            out +=
                &format!("| {section} | {case} | {metric} | {:.2} | {min:.2} | {max:.2} | {} |\n", median(v), v.len());
        }
        if !self.ratios.is_empty() {
            out += "\n| section | ratio (same rep) | metric | median | min | max |\n|---|---|---|---|---|---|\n";
            for (section, a, b, metric) in &self.ratios {
                let key = |c: &str| (section.clone(), c.to_string(), metric.clone());
                let (Some(x), Some(y)) = (self.values.get(&key(a)), self.values.get(&key(b))) else { continue };
                let r: Vec<f64> = x.iter().zip(y).map(|(p, q)| p / q).collect();
                let min = r.iter().copied().fold(f64::INFINITY, f64::min);
                let max = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                out += &format!(
                    "| {section} | {a} / {b} | {metric} | {} | {} | {} |\n",
                    ratio_text(median(&r)),
                    ratio_text(min),
                    ratio_text(max)
                );
            }
        }
        for n in &self.notes {
            out += &format!("\n{n}\n");
        }
        out
    }
}
