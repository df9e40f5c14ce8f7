//! A shared bandwidth limit: a token bucket that every worker of a job draws from before it
//! sends data. Waiting happens outside the lock, so a slow limit never blocks the other workers'
//! bookkeeping; the burst is a quarter of a second of the rate.

use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// A limit in bytes per second.
#[derive(Debug)]
pub struct Throttle {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Throttle {
    /// `bytes_per_second` > 0.
    pub fn new(bytes_per_second: u64) -> Self {
        let rate = bytes_per_second.max(1) as f64;
        Self { rate, state: Mutex::new((rate / 4.0, Instant::now())) }
    }

    /// The limit.
    pub fn bytes_per_second(&self) -> f64 {
        self.rate
    }

    /// Take `bytes`, sleeping as long as the limit requires.
    pub async fn acquire(&self, bytes: u64) {
        let wait = {
            let mut s = self.state.lock().await;
            let now = Instant::now();
            let burst = self.rate / 4.0;
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(burst.max(bytes as f64));
            s.1 = now;
            s.0 -= bytes as f64;
            if s.0 < 0.0 {
                Duration::from_secs_f64(-s.0 / self.rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Parse `100M`, `1.5G`, `500k` (bytes per second, binary units) or a plain number.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let v: f64 = num.parse().map_err(|_| format!("'{text}' is not a rate such as 100M"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("'{text}' must be more than zero"));
    }
    Ok((v * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_binary_units() {
        assert_eq!(parse_rate("100M"), Ok(100 << 20));
        assert_eq!(parse_rate("1.5G"), Ok(3 << 29));
        assert_eq!(parse_rate("4096"), Ok(4096));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
    }

    #[tokio::test]
    async fn the_bucket_holds_a_rate() {
        let t = Throttle::new(4 << 20);
        let start = Instant::now();
        for _ in 0..8 {
            t.acquire(1 << 20).await;
        }
        // 8 MiB at 4 MiB/s with a 1 MiB burst: about 1.75 s.
        assert!(start.elapsed() >= Duration::from_millis(1500), "{:?}", start.elapsed());
    }
}
