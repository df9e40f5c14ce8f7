//! Entry point of the `tunnel_inputs` fuzz target (`fuzz/`) and of its corpus replay in `cargo
//! test`: the text the tunnel's two ends are configured with, through the parsers they run.
//!
//! The first byte says what the rest is:
//! - `0`: an authorized_keys file of the hub's endpoint ([`authorized::parse`]), the one parser
//!   whose mistakes would grant a node more than its line says;
//! - `1`, `2`, `3`: a forward as `--forward-range`, `--forward` and `--reverse` take it
//!   ([`spec::parse_range`], [`spec::parse_forward`], [`spec::parse_reverse`]).
//!
//! Besides never panicking, what a parser accepts must hold up: a key whose line forbids
//! forwarding opens and listens on nothing, one with `from=` admits an address only if a
//! pattern matches it, `permitopen=`/`permitlisten=` grant only the ports listed; forwards are
//! on ports 1-65535, a range is consecutive on both ends. A broken property panics, which is
//! what a fuzzer reports.

use crate::{authorized, spec};

/// What an input was taken for, and whether its parser accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The first byte, as the kind of input (`None`: no bytes, or a kind with no parser).
    pub kind: Option<u8>,
    /// The parser accepted the rest.
    pub accepted: bool,
}

/// Addresses and ports every accepted key is asked about.
const ADDRESSES: [&str; 4] = ["127.0.0.1", "10.0.0.7", "::1", "fe80::1"];
const PORTS: [u16; 5] = [1, 22, 8082, 10100, 65535];

/// Run one input (module doc).
pub fn input(data: &[u8]) -> Outcome {
    let Some((&kind, rest)) = data.split_first() else { return Outcome { kind: None, accepted: false } };
    let text = String::from_utf8_lossy(rest);
    let accepted = match kind {
        0 => authorized_keys(&text),
        1 => range(&text),
        2 => spec::parse_forward(&text).is_ok_and(|f| f.listen.port() != 0 && f.remote_port != 0),
        3 => spec::parse_reverse(&text).is_ok_and(|r| r.local.port() != 0 && r.remote_port != 0),
        _ => return Outcome { kind: None, accepted: false },
    };
    Outcome { kind: Some(kind), accepted }
}

fn authorized_keys(text: &str) -> bool {
    let Ok(keys) = authorized::parse(text) else { return false };
    for key in &keys {
        assert!(key.line >= 1 && key.line <= text.lines().count(), "line {} of {}", key.line, text.lines().count());
        for port in PORTS {
            let open = key.allows_open("127.0.0.1", port);
            let listen = key.allows_listen(port);
            if !key.port_forwarding {
                assert!(!open && !listen, "a key without forwarding allows port {port}");
            }
            if let Some(list) = &key.permitopen {
                assert!(!open || list.iter().any(|(_, p)| *p == port), "port {port} opened, not in {list:?}");
            }
            if let Some(list) = &key.permitlisten {
                assert!(!listen || list.contains(&port), "port {port} listened on, not in {list:?}");
            }
        }
        if let Some(patterns) = &key.from {
            assert!(!patterns.is_empty() && patterns.iter().all(|p| !p.contains('/')), "{patterns:?}");
            for addr in ADDRESSES {
                let matched = patterns.iter().any(|p| !p.starts_with('!') && (p == addr || p.contains(['*', '?'])));
                assert!(!key.allows_from(addr) || matched, "{addr} admitted by {patterns:?}");
            }
        }
    }
    true
}

fn range(text: &str) -> bool {
    let Ok(forwards) = spec::parse_range(text) else { return false };
    assert!(!forwards.is_empty() && forwards.len() <= 65535);
    for pair in forwards.windows(2) {
        if let [a, b] = pair {
            assert_eq!(a.listen.port().checked_add(1), Some(b.listen.port()), "{text:?}");
            assert_eq!(a.remote_port.checked_add(1), Some(b.remote_port), "{text:?}");
        }
    }
    forwards.iter().all(|f| f.listen.port() != 0 && f.remote_port != 0)
}
