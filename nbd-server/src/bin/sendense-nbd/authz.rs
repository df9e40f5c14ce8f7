//! qemu's authorization objects, for `--tls-authz ID`: which of the clients whose certificate the
//! CA signed may connect, decided on the certificate's subject in GnuTLS's string form
//! (`nbd_server::tls_authz`), as qemu-nbd decides:
//! - `authz-simple,id=ID,identity=DN`: that one subject (`,,` for a comma inside it).
//! - `authz-list,id=ID,policy=allow|deny,rules.N.match=M,rules.N.policy=allow|deny[,rules.N.format=exact|glob]`:
//!   the first rule whose `match` equals the subject (or matches it as `fnmatch(3)`, with
//!   `format=glob`) decides; none matching, `policy` does (`deny` by default, as in qemu).
//! - `authz-listfile,id=ID,filename=PATH[,refresh=on|off]`: the same list in a JSON file
//!   (`{"policy": "deny", "rules": [{"match": "...", "policy": "allow", "format": "exact"}]}`),
//!   read at start and, with `refresh=on` (the default, as in qemu), again whenever the file
//!   changes (looked at on each TLS client, a `stat`): an edited list applies from the next
//!   client without a restart. A file that no longer loads admits no one until it does again
//!   (logged at each client): an authorization list that cannot be read fails closed.
//!
//! `authz-pam` is refused: PAM is not linked. What qemu does differently, and we refuse rather
//! than follow: `--tls-authz` with `verify-peer=off` (qemu then checks nothing, as no certificate
//! is asked for) is an error here.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use nbd_server::ClientAuthz;
use serde::Deserialize;

use crate::fnmatch::{fnmatch, unknown_class};

/// An authorization object, as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authz {
    /// `authz-simple`: one identity.
    Simple(String),
    /// `authz-list`.
    List(RuleList),
    /// `authz-listfile`.
    ListFile {
        /// The JSON file.
        path: PathBuf,
        /// Read again when it changes.
        refresh: bool,
    },
}

/// An `authz-list`'s rules and the policy when none matches.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleList {
    #[serde(default)]
    policy: Policy,
    #[serde(default)]
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Policy {
    Allow,
    #[default]
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Format {
    #[default]
    Exact,
    Glob,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    #[serde(rename = "match")]
    pattern: String,
    policy: Policy,
    #[serde(default)]
    format: Format,
}

impl RuleList {
    /// Whether `identity` is admitted: the first matching rule's policy, else the list's.
    fn admits(&self, identity: &str) -> bool {
        let decided = self.rules.iter().find(|r| match r.format {
            Format::Exact => r.pattern == identity,
            Format::Glob => fnmatch(&r.pattern, identity),
        });
        decided.map_or(self.policy, |r| r.policy) == Policy::Allow
    }

    /// Refuses a glob naming a character class fnmatch does not know.
    fn check(&self) -> Result<(), String> {
        for (n, rule) in self.rules.iter().enumerate() {
            if let Some(class) = unknown_class(&rule.pattern).filter(|_| rule.format == Format::Glob) {
                return Err(format!("rules.{n}.match: [:{class}:] is not a character class"));
            }
        }
        Ok(())
    }
}

/// Parses an `authz-*` object's fields (after its type): its id and what it says.
pub fn parse(kind: &str, fields: &[String]) -> Result<(String, Authz), String> {
    let mut id = None;
    let mut pairs = Vec::new();
    for field in fields {
        let (key, value) = field.split_once('=').ok_or_else(|| format!("'{field}' is not key=value"))?;
        if key == "id" {
            id = Some(value.to_string());
        } else {
            pairs.push((key, value));
        }
    }
    let id = id.filter(|i| !i.is_empty()).ok_or("id=ID is required")?;
    let authz = match kind {
        "authz-simple" => match pairs.as_slice() {
            [("identity", identity)] => Authz::Simple((*identity).to_string()),
            [] => return Err("identity=DN is required".into()),
            _ => return Err(only(&pairs, &["identity"])),
        },
        "authz-list" => Authz::List(list_from_keys(&pairs)?),
        "authz-listfile" => {
            let (mut path, mut refresh) = (None, true);
            for (key, value) in &pairs {
                match *key {
                    "filename" => path = Some(PathBuf::from(value)),
                    "refresh" => {
                        refresh = crate::objects::parse_bool(value)
                            .ok_or_else(|| format!("refresh={value}: give on or off"))?;
                    }
                    _ => return Err(only(&pairs, &["filename", "refresh"])),
                }
            }
            let path = path.ok_or("filename=PATH is required")?;
            load(&path)?;
            Authz::ListFile { path, refresh }
        }
        "authz-pam" => {
            return Err("authz-pam is not supported (PAM is not linked); use authz-list or authz-listfile".into())
        }
        other => return Err(format!("object type '{other}' is not supported")),
    };
    Ok((id, authz))
}

/// The refusal of a key other than `known`.
fn only(pairs: &[(&str, &str)], known: &[&str]) -> String {
    let other = pairs.iter().find(|(k, _)| !known.contains(k)).map_or("", |(k, _)| *k);
    format!("'{other}' is not supported ({} and id are)", known.join(", "))
}

/// An `authz-list` from qemu's dotted keys (`rules.0.match=...`).
fn list_from_keys(pairs: &[(&str, &str)]) -> Result<RuleList, String> {
    let mut policy = Policy::Deny;
    // (match, policy, format) per rule index, as given.
    let mut rules: Vec<(Option<String>, Option<Policy>, Format)> = Vec::new();
    for (key, value) in pairs {
        if *key == "policy" {
            policy = parse_policy(key, value)?;
            continue;
        }
        let Some((index, field)) = key.strip_prefix("rules.").and_then(|r| r.split_once('.')) else {
            return Err(format!("'{key}' is not supported (policy and rules.N.match, .policy, .format are)"));
        };
        let n: usize = index.parse().map_err(|_| format!("{key}: '{index}' is not a rule number"))?;
        // Rules are numbered from 0 without gaps, as qemu's lists are; a bound keeps a typo
        // from asking for a vector of its size.
        if n > rules.len() || n >= 4096 {
            return Err(format!("{key}: rules are numbered from 0 without gaps"));
        }
        if n == rules.len() {
            rules.push((None, None, Format::Exact));
        }
        let rule = &mut rules[n];
        match field {
            "match" => rule.0 = Some((*value).to_string()),
            "policy" => rule.1 = Some(parse_policy(key, value)?),
            "format" => {
                rule.2 = match *value {
                    "exact" => Format::Exact,
                    "glob" => Format::Glob,
                    _ => return Err(format!("{key}={value}: give exact or glob")),
                }
            }
            _ => return Err(format!("'{key}' is not supported (rules.N.match, .policy, .format are)")),
        }
    }
    let rules = rules
        .into_iter()
        .enumerate()
        .map(|(n, (pattern, policy, format))| {
            Ok(Rule {
                pattern: pattern.ok_or_else(|| format!("rules.{n}.match is required"))?,
                policy: policy.ok_or_else(|| format!("rules.{n}.policy is required"))?,
                format,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let list = RuleList { policy, rules };
    list.check()?;
    Ok(list)
}

fn parse_policy(key: &str, value: &str) -> Result<Policy, String> {
    match value {
        "allow" => Ok(Policy::Allow),
        "deny" => Ok(Policy::Deny),
        _ => Err(format!("{key}={value}: give allow or deny")),
    }
}

/// The largest list file read: a list of thousands of rules is well under it.
const MAX_LIST_FILE: u64 = 4 << 20;

/// An `authz-listfile`'s list.
fn load(path: &Path) -> Result<RuleList, String> {
    let size = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?.len();
    if size > MAX_LIST_FILE {
        return Err(format!(
            "{}: {size} bytes, more than an authorization list needs ({MAX_LIST_FILE})",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let list: RuleList = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    list.check().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(list)
}

/// What tells a file changed: its modification time, size and inode (an editor's rename).
type Stamp = (SystemTime, u64, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// The decision `--tls-authz` hands the server.
///
/// # Errors
/// A list file that does not load.
pub fn decision(authz: &Authz) -> Result<ClientAuthz, String> {
    Ok(match authz {
        Authz::Simple(identity) => {
            let identity = identity.clone();
            Arc::new(move |name: &str| name == identity)
        }
        Authz::List(list) => {
            let list = list.clone();
            Arc::new(move |name: &str| list.admits(name))
        }
        Authz::ListFile { path, refresh: false } => {
            let list = load(path)?;
            Arc::new(move |name: &str| list.admits(name))
        }
        Authz::ListFile { path, refresh: true } => {
            let watched =
                Arc::new(WatchedList { path: path.clone(), state: Mutex::new((stamp(path), Ok(load(path)?))) });
            Arc::new(move |name: &str| watched.admits(name))
        }
    })
}

/// A list file read again when its stamp changes.
struct WatchedList {
    path: PathBuf,
    /// The stamp last read, and the list it held (or why it did not load).
    state: Mutex<(Option<Stamp>, Result<RuleList, String>)>,
}

impl WatchedList {
    fn admits(&self, name: &str) -> bool {
        let now = stamp(&self.path);
        let Ok(mut state) = self.state.lock() else { return false };
        if now.is_none() || now != state.0 {
            state.1 = load(&self.path);
            state.0 = now;
            match &state.1 {
                Ok(_) => tracing::info!(file = %self.path.display(), "authorization list read again"),
                Err(e) => {
                    tracing::error!(error = %e, "authorization list does not load: no TLS client is admitted until it does")
                }
            }
        }
        match &state.1 {
            Ok(list) => list.admits(name),
            Err(e) => {
                tracing::warn!(identity = name, error = %e, "TLS client refused: the authorization list does not load");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> Vec<String> {
        crate::objects::split_fields(text)
    }

    #[test]
    fn lists_decide_by_their_first_matching_rule_then_their_policy() {
        let (id, authz) = parse(
            "authz-list",
            &fields("id=a0,policy=deny,rules.0.match=CN=eve,rules.0.policy=deny,rules.1.match=*,,O=Example,rules.1.policy=allow,rules.1.format=glob"),
        )
        .unwrap();
        assert_eq!(id, "a0");
        let admits = decision(&authz).unwrap();
        assert!(admits("CN=bob,O=Example"));
        assert!(admits("CN=eve,O=Example"), "exact: only the name CN=eve itself is denied by rule 0");
        assert!(!admits("CN=eve"));
        assert!(!admits("CN=bob,O=Other"));
        let (_, allow_all) = parse("authz-list", &fields("id=a,policy=allow")).unwrap();
        assert!(decision(&allow_all).unwrap()("anyone"));
        let (_, simple) = parse("authz-simple", &fields("id=s,identity=CN=a,,O=b")).unwrap();
        assert_eq!(simple, Authz::Simple("CN=a,O=b".into()));
        assert!(decision(&simple).unwrap()("CN=a,O=b"));
        assert!(!decision(&simple).unwrap()("CN=a,O=b2"));
    }

    #[test]
    fn what_qemu_would_not_take_or_we_do_not_do_is_refused_with_a_reason() {
        for (kind, text, says) in [
            ("authz-simple", "id=s", "identity=DN is required"),
            ("authz-simple", "identity=x", "id=ID is required"),
            ("authz-simple", "id=s,identity=x,other=y", "'other' is not supported"),
            ("authz-list", "id=l,rules.1.match=x,rules.1.policy=allow", "without gaps"),
            ("authz-list", "id=l,rules.0.match=x", "rules.0.policy is required"),
            ("authz-list", "id=l,rules.0.policy=allow", "rules.0.match is required"),
            ("authz-list", "id=l,rules.0.match=x,rules.0.policy=maybe", "give allow or deny"),
            ("authz-list", "id=l,rules.0.match=x,rules.0.policy=allow,rules.0.format=regex", "give exact or glob"),
            ("authz-list", "id=l,rules.0.match=[[:nope:]],rules.0.policy=allow,rules.0.format=glob", "[:nope:]"),
            ("authz-list", "id=l,rules.x.match=a", "not a rule number"),
            ("authz-list", "id=l,rules.99999.match=a", "without gaps"),
            ("authz-list", "id=l,colour=red", "'colour' is not supported"),
            ("authz-listfile", "id=f", "filename=PATH is required"),
            ("authz-listfile", "id=f,filename=/nonexistent/list.json", "/nonexistent/list.json"),
            ("authz-listfile", "id=f,filename=/x,refresh=sometimes", "give on or off"),
            ("authz-pam", "id=p,service=login", "PAM"),
        ] {
            let e = parse(kind, &fields(text)).unwrap_err();
            assert!(e.contains(says), "{kind},{text}: {e}");
        }
    }

    #[test]
    fn a_list_file_is_read_again_when_it_changes_and_admits_no_one_while_it_does_not_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("list.json");
        let write = |text: &str| {
            // Through a rename, as editors do: a new inode, whatever the clock's resolution.
            let tmp = dir.path().join("list.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        write(r#"{"policy": "deny", "rules": [{"match": "CN=a", "policy": "allow"}]}"#);
        let (_, authz) = parse("authz-listfile", &fields(&format!("id=f,filename={}", path.display()))).unwrap();
        let admits = decision(&authz).unwrap();
        assert!(admits("CN=a") && !admits("CN=b"));
        write(r#"{"rules": [{"match": "CN=[ab]", "policy": "allow", "format": "glob"}]}"#);
        assert!(admits("CN=a") && admits("CN=b") && !admits("CN=c"));
        write(r#"{"rules": [{"match": "CN=a", "policy": "allow", "colour": "red"}]}"#);
        assert!(!admits("CN=a"), "a list that does not load admits no one");
        write(r#"{"policy": "allow"}"#);
        assert!(admits("CN=z"));
        let (_, fixed) =
            parse("authz-listfile", &fields(&format!("id=f,filename={},refresh=off", path.display()))).unwrap();
        let fixed = decision(&fixed).unwrap();
        write(r#"{"policy": "deny"}"#);
        assert!(fixed("CN=z"), "refresh=off keeps what was read at start");
        assert!(!admits("CN=z"));
    }
}
