//! authorized_keys parsing for the hub endpoint: OpenSSH's format, failing closed.
//!
//! Honoured: `from=` (comma-separated address patterns with `*`/`?` wildcards and `!` negation,
//! matched against the canonical address, so `::ffff:10.0.0.1` is `10.0.0.1`), `permitopen=`
//! (several, each `host:port`), `permitlisten=` (several, `[host:]port`), `restrict` (no
//! forwarding unless `port-forwarding` follows), `no-port-forwarding`, `port-forwarding`,
//! `expiry-time=`. Accepted because they only concern what the endpoint never grants (a shell,
//! a pty, agent or X11 forwarding, rc files, environment): `no-pty`, `pty`, `no-agent-forwarding`,
//! `agent-forwarding`, `no-x11-forwarding`, `x11-forwarding`, `no-user-rc`, `user-rc`,
//! `command=`, `environment=`. Anything else (`cert-authority`, `principals=`, `tunnel=`, FIDO
//! options, typos), a duplicated single-valued option, an escaped quote or a CIDR mask makes the
//! line an error naming it: never a key with more rights than its line says.

use russh::keys::PublicKey;

/// One authorized key with its restrictions.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AuthorizedKey {
    /// The key.
    pub key: PublicKey,
    /// `from=` patterns, if any.
    pub from: Option<Vec<String>>,
    /// `permitopen=` destinations, if any (`host`, `port`).
    pub permitopen: Option<Vec<(String, u16)>>,
    /// `permitlisten=` ports, if any.
    pub permitlisten: Option<Vec<u16>>,
    /// False after `restrict` or `no-port-forwarding` (unless `port-forwarding` follows).
    pub port_forwarding: bool,
    /// `expiry-time=` as seconds since the epoch (UTC).
    pub expires: Option<u64>,
    /// Line number (1-based) for messages.
    pub line: usize,
}

/// A line that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("authorized_keys line {line}: {reason}")]
pub struct AuthorizedKeysError {
    /// Line number.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

fn is_key_type(word: &str) -> bool {
    word.starts_with("ssh-") || word.starts_with("ecdsa-sha2-") || word.starts_with("sk-")
}

/// Split the options field at commas outside double quotes.
fn split_options(opts: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in opts.chars() {
        match ch {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(ch),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Parse an authorized_keys file.
///
/// # Errors
/// The first line that cannot be parsed (unknown key encoding, bad option value).
pub fn parse(text: &str) -> Result<Vec<AuthorizedKey>, AuthorizedKeysError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.trim();
        if raw.is_empty() || raw.starts_with('#') {
            continue;
        }
        let err = |reason: String| AuthorizedKeysError { line, reason };
        // Options come first unless the line starts with the key type.
        let (options, rest) = if raw.split_whitespace().next().is_some_and(is_key_type) {
            ("", raw)
        } else {
            let mut quoted = false;
            let mut end = raw.len();
            for (at, ch) in raw.char_indices() {
                match ch {
                    '"' => quoted = !quoted,
                    ' ' | '\t' if !quoted => {
                        end = at;
                        break;
                    }
                    _ => {}
                }
            }
            (raw.get(..end).unwrap_or(""), raw.get(end..).unwrap_or("").trim_start())
        };
        let mut fields = rest.split_whitespace();
        let (Some(kind), Some(blob)) = (fields.next(), fields.next()) else {
            return Err(err("expected [options] type base64 [comment]".into()));
        };
        if !is_key_type(kind) {
            return Err(err(format!("unknown key type '{kind}'")));
        }
        let key = russh::keys::parse_public_key_base64(blob).map_err(|e| err(format!("bad key: {e}")))?;
        if options.contains("\\\"") {
            return Err(err("escaped quotes in options are not supported".into()));
        }
        let mut from = None;
        let mut permitopen: Option<Vec<(String, u16)>> = None;
        let mut permitlisten: Option<Vec<u16>> = None;
        let mut port_forwarding = true;
        let mut expires = None;
        for opt in split_options(options) {
            let (name, value) = opt
                .split_once('=')
                .map(|(n, v)| (n.to_ascii_lowercase(), Some(v)))
                .unwrap_or((opt.to_ascii_lowercase(), None));
            match (name.as_str(), value) {
                ("from", Some(v)) => {
                    if from.is_some() {
                        return Err(err("from= appears twice".into()));
                    }
                    let pats: Vec<String> =
                        v.split(',').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect();
                    if pats.iter().any(|p| p.contains('/')) {
                        return Err(err("from= with CIDR masks is not supported; list addresses or wildcards".into()));
                    }
                    if pats.is_empty() {
                        return Err(err("from= is empty".into()));
                    }
                    from = Some(pats);
                }
                ("permitopen", Some(v)) => {
                    let (host, port) =
                        v.rsplit_once(':').ok_or_else(|| err(format!("permitopen=\"{v}\" needs host:port")))?;
                    let port = port.parse::<u16>().map_err(|_| err(format!("permitopen=\"{v}\" has a bad port")))?;
                    permitopen.get_or_insert_with(Vec::new).push((host.to_string(), port));
                }
                ("permitlisten", Some(v)) => {
                    let port = v.rsplit_once(':').map(|(_, p)| p).unwrap_or(v);
                    let port = port.parse::<u16>().map_err(|_| err(format!("permitlisten=\"{v}\" has a bad port")))?;
                    permitlisten.get_or_insert_with(Vec::new).push(port);
                }
                ("restrict" | "no-port-forwarding", None) => port_forwarding = false,
                ("port-forwarding", None) => port_forwarding = true,
                ("expiry-time", Some(v)) => {
                    if expires.is_some() {
                        return Err(err("expiry-time= appears twice".into()));
                    }
                    expires = Some(
                        parse_expiry(v).ok_or_else(|| err(format!("expiry-time=\"{v}\" is not YYYYMMDD[HHMM[SS]]")))?,
                    );
                }
                (
                    "no-pty"
                    | "pty"
                    | "no-agent-forwarding"
                    | "agent-forwarding"
                    | "no-x11-forwarding"
                    | "x11-forwarding"
                    | "no-user-rc"
                    | "user-rc",
                    None,
                )
                | ("command" | "environment", Some(_)) => {}
                (other, _) => {
                    return Err(err(format!(
                        "option '{other}' is not supported here (the line is refused, not trusted)"
                    )))
                }
            }
        }
        out.push(AuthorizedKey { key, from, permitopen, permitlisten, port_forwarding, expires, line });
    }
    Ok(out)
}

/// `YYYYMMDD[HHMM[SS]]` (UTC) as seconds since the epoch.
fn parse_expiry(v: &str) -> Option<u64> {
    if !v.chars().all(|c| c.is_ascii_digit()) || !matches!(v.len(), 8 | 12 | 14) {
        return None;
    }
    let num = |a: usize, b: usize| v.get(a..b).and_then(|t| t.parse::<i64>().ok());
    let (y, m, d) = (num(0, 4)?, num(4, 6)?, num(6, 8)?);
    let (hh, mm, ss) = (num(8, 10).unwrap_or(0), num(10, 12).unwrap_or(0), num(12, 14).unwrap_or(0));
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    // days_from_civil (H. Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86400 + hh * 3600 + mm * 60 + ss).ok()
}

/// `*`/`?` glob match.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0usize, 0usize, None, 0usize);
    while ti < t.len() {
        match p.get(pi) {
            Some('?') => {
                pi += 1;
                ti += 1;
            }
            Some(c) if *c != '*' && Some(c) == t.get(ti) => {
                pi += 1;
                ti += 1;
            }
            Some('*') => {
                star = Some(pi);
                mark = ti;
                pi += 1;
            }
            _ => match star {
                Some(s) => {
                    pi = s + 1;
                    mark += 1;
                    ti = mark;
                }
                None => return false,
            },
        }
    }
    p.get(pi..).is_some_and(|rest| rest.iter().all(|c| *c == '*'))
}

impl AuthorizedKey {
    /// Whether the key may still be used at `now` (seconds since the epoch).
    pub fn valid_at(&self, now: u64) -> bool {
        self.expires.is_none_or(|e| now < e)
    }

    /// Whether this key may ask the hub to listen on `port` (forwarding allowed, `permitlisten=`).
    pub fn allows_listen(&self, port: u16) -> bool {
        self.port_forwarding && self.permitlisten.as_ref().is_none_or(|l| l.contains(&port))
    }

    /// Whether a client at `addr` may use this key (`from=`).
    pub fn allows_from(&self, addr: &str) -> bool {
        let Some(pats) = &self.from else { return true };
        let mut allowed = false;
        for p in pats {
            if let Some(neg) = p.strip_prefix('!') {
                if glob(neg, addr) {
                    return false;
                }
            } else if glob(p, addr) {
                allowed = true;
            }
        }
        allowed
    }

    /// Whether this key may open `host:port` (forwarding allowed, `permitopen=`).
    pub fn allows_open(&self, host: &str, port: u16) -> bool {
        if !self.port_forwarding {
            return false;
        }
        match &self.permitopen {
            None => true,
            Some(list) => list.iter().any(|(h, p)| (h == host || h == "*") && *p == port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb8qoqZtrb2+TCr0jq9UPZ+N7cSMQfDg+XKQ1uQ5fN0 node@host";

    #[test]
    fn options_from_and_permitopen_are_parsed_and_applied() {
        let text = format!("# comment\n\n{KEY}\nfrom=\"127.0.0.*,!127.0.0.9\",permitopen=\"127.0.0.1:10100\",permitopen=\"127.0.0.1:8082\",no-pty {KEY}\n");
        let keys = parse(&text).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys[0].allows_from("10.1.2.3") && keys[0].allows_open("127.0.0.1", 22));
        let k = &keys[1];
        assert_eq!(k.line, 4);
        assert!(k.allows_from("127.0.0.1"));
        assert!(!k.allows_from("127.0.0.9"), "negated");
        assert!(!k.allows_from("192.168.1.1"));
        assert!(k.allows_open("127.0.0.1", 8082) && !k.allows_open("127.0.0.1", 8083));
    }

    #[test]
    fn broken_lines_name_their_line() {
        assert_eq!(parse("\nssh-ed25519 !!!notbase64").unwrap_err().line, 2);
        assert!(parse(&format!("from=\"10.0.0.0/8\" {KEY}")).is_err());
        assert!(parse(&format!("permitopen=\"nohost\" {KEY}")).is_err());
        assert!(parse("ssh-ed25519").is_err());
    }

    #[test]
    fn restrictions_are_honoured_and_anything_unknown_is_refused() {
        let k = &parse(&format!("restrict {KEY}")).unwrap()[0];
        assert!(!k.allows_open("127.0.0.1", 10100) && !k.allows_listen(9081), "restrict forbids forwarding");
        let k = &parse(&format!("restrict,port-forwarding,permitlisten=\"127.0.0.1:9081\" {KEY}")).unwrap()[0];
        assert!(k.allows_open("127.0.0.1", 10100) && k.allows_listen(9081) && !k.allows_listen(9082));
        let k = &parse(&format!("no-port-forwarding,no-pty {KEY}")).unwrap()[0];
        assert!(!k.allows_open("127.0.0.1", 10100));
        let k = &parse(&format!("expiry-time=\"20200101\" {KEY}")).unwrap()[0];
        assert_eq!(k.expires, Some(1_577_836_800));
        assert!(!k.valid_at(1_800_000_000) && k.valid_at(1_500_000_000));
        for bad in [
            "cert-authority",
            "principals=\"a\"",
            "tunnel=\"1\"",
            "no-portforwarding",
            "verify-required",
            "from=\"a\",from=\"b\"",
            "expiry-time=\"2020\"",
            "command=\"echo \\\"hi\\\"\"",
        ] {
            let e = parse(&format!("{bad} {KEY}")).unwrap_err();
            assert_eq!(e.line, 1, "{bad}");
        }
        assert!(parse(&format!("no-portforwarding {KEY}")).unwrap_err().reason.contains("no-portforwarding"));
    }

    #[test]
    fn glob_handles_stars_and_question_marks() {
        assert!(glob("127.0.0.*", "127.0.0.12"));
        assert!(glob("1?7.*", "127.9"));
        assert!(!glob("127.0.0.?", "127.0.0.12"));
        assert!(glob("*", ""));
    }
}
