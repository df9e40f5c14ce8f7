//! The node's bandwidth limit (`[copy] bandwidth_limit`), shared fairly by the jobs under it.
//!
//! One bucket per limit: every job draws from it before it sends data, so the node never sends
//! more than the limit, whatever runs at once (a reload that leaves the limit as it was keeps the
//! bucket). Each job draws through a flow of its own ([`Throttle::flow`]), and the flows share the
//! bucket fairly by bytes: waiting requests are served in start-time fair queueing order (a
//! request's tag is where its flow's previous request ended, but never before the request last
//! served), so two jobs that both send get half each however many workers each has, and one gets
//! all of it while the other sends nothing (hashing unchanged blocks, or done). The FIFO bucket
//! before this served requests as they came, which gave a VM copied four disks at once four times
//! the bandwidth of a VM of one disk. Hand-written: the rate-limiting crates (`governor`,
//! `leaky-bucket`) are FIFO or per key without a share between keys.
//!
//! The burst is a quarter of a second of the rate. Waiting happens outside the lock, and only the
//! request first in line is woken when its turn may have come; a waiter that is dropped (its job
//! cancelled) leaves the queue and gives back its place in its flow.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
// Tokio's clock: tests run it paused, and the shares come out exact.
use tokio::time::Instant;

/// A limit in bytes per second: a flow of a shared bucket.
#[derive(Debug)]
pub struct Throttle {
    bucket: Arc<Bucket>,
    flow: u64,
}

#[derive(Debug)]
struct Bucket {
    rate: f64,
    state: Mutex<State>,
    next_flow: AtomicU64,
}

/// A waiting request: (start tag, arrival).
type Ticket = (u64, u64);

#[derive(Debug)]
struct State {
    /// Bytes that may be sent now (negative: owed by the last request served).
    tokens: f64,
    refilled: Instant,
    /// The start tag of the request served last.
    virtual_now: u64,
    /// Per flow, the tag where its last request ends.
    finish: HashMap<u64, u64>,
    /// Waiting requests in the order they are served, each with the bell that tells it it is
    /// first (only the first is woken: no herd of waiters at each request served).
    queue: BTreeMap<Ticket, Arc<Notify>>,
    arrivals: u64,
}

impl Throttle {
    /// A new bucket of `bytes_per_second` (> 0), and its first flow.
    pub fn new(bytes_per_second: u64) -> Self {
        let rate = bytes_per_second.max(1) as f64;
        let state = State {
            tokens: rate / 4.0,
            refilled: Instant::now(),
            virtual_now: 0,
            finish: HashMap::new(),
            queue: BTreeMap::new(),
            arrivals: 0,
        };
        let bucket = Bucket { rate, state: Mutex::new(state), next_flow: AtomicU64::new(1) };
        Self { bucket: Arc::new(bucket), flow: 0 }
    }

    /// Another flow of the same bucket (one per job).
    pub fn flow(&self) -> Self {
        Self { bucket: Arc::clone(&self.bucket), flow: self.bucket.next_flow.fetch_add(1, Ordering::Relaxed) }
    }

    /// The limit.
    pub fn bytes_per_second(&self) -> f64 {
        self.bucket.rate
    }

    /// Whether `other` draws on the same bucket.
    pub fn same_bucket(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.bucket, &other.bucket)
    }

    /// Whether `other` is the same flow of the same bucket.
    pub fn same_flow(&self, other: &Self) -> bool {
        self.same_bucket(other) && self.flow == other.flow
    }

    /// Take `bytes`, waiting for this flow's turn and for the bucket to allow them.
    pub async fn acquire(&self, bytes: u64) {
        let bucket = &*self.bucket;
        let bell = Arc::new(Notify::new());
        let ticket = bucket.lock().enqueue(self.flow, bytes, Arc::clone(&bell));
        let mut place = Waiting { bucket, flow: self.flow, bytes, ticket: Some(ticket) };
        loop {
            let next = {
                let mut s = bucket.lock();
                if s.queue.first_key_value().map(|(first, _)| first) != Some(&ticket) {
                    Next::Rung
                } else {
                    s.refill(bucket.rate);
                    if s.tokens > -1.0 {
                        // Served: the bytes are taken now (the next in line waits for them), and
                        // this request waits for what it took beyond the bucket.
                        s.queue.remove(&ticket);
                        s.virtual_now = ticket.0;
                        s.tokens -= bytes as f64;
                        s.forget_idle_flows();
                        s.ring_first();
                        place.ticket = None;
                        Next::Served(Duration::from_secs_f64((-s.tokens).max(0.0) / bucket.rate))
                    } else {
                        Next::Paid(Duration::from_secs_f64(-s.tokens / bucket.rate))
                    }
                }
            };
            match next {
                // Nothing owed: no timer (a zero sleep still waits for the timer's next tick,
                // up to a millisecond per request under a high limit).
                Next::Served(owed) if owed.is_zero() => return,
                Next::Served(owed) => return tokio::time::sleep(owed).await,
                // First in line: until the bucket has paid for the requests served (a request
                // with an earlier tag that arrives meanwhile takes the place, and this one then
                // waits to be rung).
                Next::Paid(wait) => tokio::time::sleep(wait).await,
                // A ring that came before this wait is kept (`notify_one` stores it).
                Next::Rung => bell.notified().await,
            }
        }
    }
}

/// What a waiting request does next.
enum Next {
    /// Served: wait this long for what it took beyond the bucket, then send.
    Served(Duration),
    /// First in line: wait this long for the bucket to pay what it owes, then look again.
    Paid(Duration),
    /// Not first: wait to be told it is.
    Rung,
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.bucket.lock().finish.remove(&self.flow);
    }
}

impl Bucket {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change to the state is whole before anything that could panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn enqueue(&mut self, flow: u64, bytes: u64, bell: Arc<Notify>) -> Ticket {
        let start = self.finish.get(&flow).copied().unwrap_or(0).max(self.virtual_now);
        self.finish.insert(flow, start.saturating_add(bytes));
        self.arrivals += 1;
        let ticket = (start, self.arrivals);
        self.queue.insert(ticket, bell);
        ticket
    }

    /// Tell the request now first in line that it is.
    fn ring_first(&self) {
        if let Some((_, bell)) = self.queue.first_key_value() {
            bell.notify_one();
        }
    }

    fn refill(&mut self, rate: f64) {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * rate;
        self.tokens = (self.tokens + earned).min(rate / 4.0);
        self.refilled = now;
    }

    /// Flows whose last request ended before the one served: their tag says no more than the
    /// virtual time does.
    fn forget_idle_flows(&mut self) {
        if self.finish.len() > 64 {
            let now = self.virtual_now;
            self.finish.retain(|_, end| *end > now);
        }
    }
}

/// A request's place in the queue, given up if its future is dropped before it is served.
struct Waiting<'a> {
    bucket: &'a Bucket,
    flow: u64,
    bytes: u64,
    ticket: Option<Ticket>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(ticket) = self.ticket.take() else { return };
        let mut s = self.bucket.lock();
        s.queue.remove(&ticket);
        // The flow's next request starts where this one would have, unless another came since.
        if s.finish.get(&self.flow) == Some(&ticket.0.saturating_add(self.bytes)) {
            s.finish.insert(self.flow, ticket.0);
        }
        s.ring_first();
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
    // Whole bytes: `0.5` would be a limit of nothing (found by fuzzing, `node::fuzzing`).
    let bytes = if v.is_finite() { (v * mult as f64) as u64 } else { 0 };
    if bytes == 0 {
        return Err(format!("'{text}' must be at least one byte"));
    }
    Ok(bytes)
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
        assert!(parse_rate("0.6").is_err(), "less than a byte");
        assert!(parse_rate("-1M").is_err() && parse_rate("NaN").is_err() && parse_rate("inf").is_err());
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

    /// `workers` tasks of `flow` sending 256 KiB requests for as long as the test runs; the
    /// bytes each flow got.
    fn send(flow: &Arc<Throttle>, workers: usize) -> Arc<AtomicU64> {
        let got = Arc::new(AtomicU64::new(0));
        for _ in 0..workers {
            let (flow, got) = (Arc::clone(flow), Arc::clone(&got));
            tokio::spawn(async move {
                loop {
                    flow.acquire(256 << 10).await;
                    got.fetch_add(256 << 10, Ordering::Relaxed);
                }
            });
        }
        got
    }

    /// Virtual time (paused): the shares are exact, not a race.
    #[tokio::test(start_paused = true)]
    async fn jobs_under_one_limit_get_equal_shares_whatever_their_workers() {
        let node = Throttle::new(8 << 20);
        let (four_disks, one_disk) = (Arc::new(node.flow()), Arc::new(node.flow()));
        let (a, b) = (send(&four_disks, 16), send(&one_disk, 4));
        tokio::time::sleep(Duration::from_secs(20)).await;
        let (a, b) = (a.load(Ordering::Relaxed) as f64, b.load(Ordering::Relaxed) as f64);
        let limit = 20.0 * f64::from(8 << 20) + f64::from(2 << 20) + f64::from(256 << 10);
        assert!(a + b <= limit, "the node sent {} MiB in 20 s at 8 MiB/s", (a + b) / 1048576.0);
        assert!(a + b >= 0.95 * 20.0 * f64::from(8 << 20), "the limit is used: {}", (a + b) / 1048576.0);
        assert!((a / b - 1.0).abs() < 0.05, "16 workers got {a}, 4 got {b}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_alone_gets_the_whole_limit_and_shares_it_once_another_sends() {
        let node = Throttle::new(8 << 20);
        let (first, second) = (Arc::new(node.flow()), Arc::new(node.flow()));
        let a = send(&first, 4);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let alone = a.load(Ordering::Relaxed) as f64;
        assert!(alone >= 0.95 * 10.0 * f64::from(8 << 20), "{alone}: an idle flow holds nothing back");
        let b = send(&second, 1);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (a, b) = (a.load(Ordering::Relaxed) as f64 - alone, b.load(Ordering::Relaxed) as f64);
        assert!((a / b - 1.0).abs() < 0.05, "after the second job started: 4 workers {a}, 1 worker {b}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_dropped_in_the_queue_holds_up_nobody() {
        let node = Throttle::new(1 << 20);
        let (a, b, c) = (Arc::new(node.flow()), node.flow(), node.flow());
        let start = tokio::time::Instant::now();
        // Served at once, it leaves the bucket owing 7 of its 8 MiB (7.75 s).
        let big = tokio::spawn(async move { a.acquire(8 << 20).await });
        tokio::task::yield_now().await;
        let dropped = tokio::time::timeout(Duration::from_secs(1), b.acquire(1 << 20)).await;
        assert!(dropped.is_err(), "it was queued behind the debt");
        let next = tokio::time::timeout(Duration::from_secs(60), c.acquire(1 << 20)).await;
        assert!(next.is_ok(), "the next in line is not stuck behind the dropped one");
        let waited = start.elapsed();
        assert!(waited >= Duration::from_secs(8), "it waited for the debt and its own MiB: {waited:?}");
        assert!(waited < Duration::from_secs(9), "and no more: {waited:?}");
        big.await.unwrap();
        // The dropped request gave its place back: its flow's next one is not behind a phantom.
        let s = node.bucket.lock();
        assert_eq!((s.queue.len(), s.finish.get(&b.flow).copied()), (0, Some(0)), "{s:?}");
    }
}
