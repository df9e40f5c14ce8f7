//! The addresses nodes logged in from, kept in the repository (`REPO/.ssh-known-addresses`, one
//! address a line, the latest first) across the hub's restarts.
//!
//! The SSH endpoint keeps places before login for addresses a key has logged in from
//! (`tunnel::endpoint::LoginLimits::reserved_for_known`), so that a flood of silent connections
//! cannot lock the nodes out. Those addresses were only the ones seen since the endpoint started:
//! a hub restarted during such a flood (or whose restart brought every node back at once, while
//! strangers held the places) had none to keep places for. Now the endpoint is told the kept
//! ones at start and the file is written again when they change (looked at every
//! [`SAVE_EVERY`]: a login in the last seconds before a crash is learnt again at its next one).
//!
//! The file is read as untrusted: at most [`MAX_FILE`] bytes and [`MAX_ADDRESSES`] addresses, a
//! line that is not an address is skipped, and a file that cannot be read only means no address
//! is known yet.

use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tunnel::endpoint::Endpoint;

/// The file's name in the repository.
pub const FILE: &str = ".ssh-known-addresses";
/// How often the endpoint's addresses are looked at, and written when they changed.
pub const SAVE_EVERY: Duration = Duration::from_secs(10);
/// The most addresses read (the endpoint remembers as many).
const MAX_ADDRESSES: usize = 1024;
/// The most bytes read (1024 addresses of up to 39 characters and a newline).
const MAX_FILE: u64 = 40 * 1024;

/// The addresses kept in `path`, the latest first (none when it is missing or unreadable).
pub fn read(path: &Path) -> Vec<IpAddr> {
    let mut text = String::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(MAX_FILE).read_to_string(&mut text));
    if let Err(e) = read {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the addresses nodes logged in from");
        }
        return Vec::new();
    }
    text.lines().filter_map(|l| l.trim().parse().ok()).take(MAX_ADDRESSES).collect()
}

/// Keep `addresses` in `path`, whole or not at all.
///
/// # Errors
/// The file cannot be written.
pub fn write(path: &Path, addresses: &[IpAddr]) -> std::io::Result<()> {
    let text: String = addresses.iter().map(|a| format!("{a}\n")).collect();
    node::files::write_atomically(path, text.as_bytes())
}

/// Write `endpoint`'s known addresses to `path` whenever they change, until the task is dropped.
pub async fn keep(endpoint: Arc<Endpoint>, path: PathBuf) {
    let mut saved = read(&path);
    loop {
        tokio::time::sleep(SAVE_EVERY).await;
        let now = endpoint.known_addresses();
        if now == saved {
            continue;
        }
        let (file, addresses) = (path.clone(), now.clone());
        match tokio::task::spawn_blocking(move || write(&file, &addresses)).await {
            Ok(Ok(())) => saved = now,
            Ok(Err(e)) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot keep the addresses nodes logged in from")
            }
            Err(e) => tracing::warn!(error = %e, "keeping the addresses nodes logged in from failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_kept_and_read_back_and_what_is_not_one_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        assert!(read(&path).is_empty(), "no file: none known");
        let kept: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::7".parse().unwrap()];
        write(&path, &kept).unwrap();
        assert_eq!(read(&path), kept);
        std::fs::write(&path, "10.0.0.5\nnot an address\n\n 192.0.2.1 \n999.1.1.1\n").unwrap();
        assert_eq!(read(&path), ["10.0.0.5".parse::<IpAddr>().unwrap(), "192.0.2.1".parse().unwrap()]);
        // A hostile file: read up to its bound, never all of it.
        let many: String =
            (0..100_000u32).map(|i| format!("10.{}.{}.{}\n", i >> 16, (i >> 8) & 255, i & 255)).collect();
        std::fs::write(&path, many).unwrap();
        let read_back = read(&path);
        assert!(!read_back.is_empty() && read_back.len() <= MAX_ADDRESSES, "{}", read_back.len());
    }
}
