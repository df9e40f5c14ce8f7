//! `fnmatch(3)` with no flags, the matching qemu's `authz-list` rules of `format=glob` use: `*`
//! any run of characters (`/` and a leading `.` included), `?` any one, `[...]` one of a set
//! (`!` or `^` first negates it, `]` first is itself, `a-z` ranges, `[:alpha:]` classes), and a
//! backslash makes the next character itself, inside a set too. A `[` without its `]` is itself.
//! The cases of the tests were checked against glibc's `fnmatch` (C.UTF-8 locale).
//! Written here rather than taken from a glob crate because those are path globs (`**`, `/`
//! special, no backslash escape): a rule must admit here exactly whom it admits in qemu-nbd.
//! Matching is on characters, with backtracking only to the last `*`, so time stays linear in
//! the pattern times the name.

/// The classes `[:NAME:]` may name.
const CLASSES: &[&str] =
    &["alnum", "alpha", "blank", "cntrl", "digit", "graph", "lower", "print", "punct", "space", "upper", "xdigit"];

/// Whether `pattern` matches all of `name`.
pub fn fnmatch(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = name.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Where to go on from when what follows the last `*` fails: the pattern after it, and the
    // name's position that `*` has swallowed up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if let Some(next) = step(&p, pi, t[ti]) {
            match next {
                Step::Star => {
                    star = Some((pi + 1, ti));
                    pi += 1;
                }
                Step::Matched(after) => {
                    pi = after;
                    ti += 1;
                }
            }
            continue;
        }
        let Some((after_star, swallowed)) = star else { return false };
        pi = after_star;
        ti = swallowed + 1;
        star = Some((after_star, ti));
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// What the pattern at `pi` does with the name's next character.
enum Step {
    /// A `*`.
    Star,
    /// It matched; the pattern goes on at this index.
    Matched(usize),
}

/// The pattern element at `pi` against `c`; `None` when it does not match (or the pattern ended).
fn step(p: &[char], pi: usize, c: char) -> Option<Step> {
    match *p.get(pi)? {
        '*' => Some(Step::Star),
        '?' => Some(Step::Matched(pi + 1)),
        '[' => match set(p, pi, c) {
            Some((true, after)) => Some(Step::Matched(after)),
            Some((false, _)) => None,
            None => (c == '[').then_some(Step::Matched(pi + 1)),
        },
        // A backslash that ends the pattern escapes nothing: glibc then matches nothing.
        '\\' => (p.get(pi + 1) == Some(&c)).then_some(Step::Matched(pi + 2)),
        literal => (literal == c).then_some(Step::Matched(pi + 1)),
    }
}

/// The set starting at `p[start] == '['` against `c`: whether it matches and the index after its
/// `]`; `None` when it has no `]` (the `[` is then a plain character).
fn set(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negated = matches!(p.get(i), Some('!' | '^'));
    if negated {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let here = *p.get(i)?;
        if here == ']' && !first {
            return Some((matched != negated, i + 1));
        }
        first = false;
        if here == '[' && p.get(i + 1) == Some(&':') {
            if let Some(len) = p[i + 2..].windows(2).position(|w| w == [':', ']']) {
                let class: String = p[i + 2..i + 2 + len].iter().collect();
                matched |= in_class(&class, c);
                i += 2 + len + 2;
                continue;
            }
        }
        let (low, after) = literal_at(p, i)?;
        i = after;
        if p.get(i) == Some(&'-') && p.get(i + 1).is_some_and(|n| *n != ']') {
            let (high, after) = literal_at(p, i + 1)?;
            i = after;
            matched |= low <= c && c <= high;
        } else {
            matched |= low == c;
        }
    }
}

/// The character at `i` of a set (a backslash escapes the next) and the index after it.
fn literal_at(p: &[char], i: usize) -> Option<(char, usize)> {
    match *p.get(i)? {
        '\\' => Some((*p.get(i + 1)?, i + 2)),
        c => Some((c, i + 1)),
    }
}

/// Whether `c` is in the character class `name` (an unknown name holds nothing; patterns are
/// checked with [`unknown_class`] when a rule is read).
fn in_class(name: &str, c: char) -> bool {
    match name {
        "alnum" => c.is_alphanumeric(),
        "alpha" => c.is_alphabetic(),
        "blank" => c == ' ' || c == '\t',
        "cntrl" => c.is_control(),
        "digit" => c.is_ascii_digit(),
        "graph" => !c.is_whitespace() && !c.is_control(),
        "lower" => c.is_lowercase(),
        "print" => !c.is_control(),
        "punct" => c.is_ascii_punctuation(),
        "space" => c.is_whitespace(),
        "upper" => c.is_uppercase(),
        "xdigit" => c.is_ascii_hexdigit(),
        _ => false,
    }
}

/// The first `[:NAME:]` in `pattern` that names no class (fnmatch fails such a pattern as an
/// error, so a rule holding one is refused when read rather than never matching).
pub fn unknown_class(pattern: &str) -> Option<String> {
    let mut rest = pattern;
    while let Some(at) = rest.find("[:") {
        let after = &rest[at + 2..];
        let Some(end) = after.find(":]") else { break };
        let name = &after[..end];
        if !CLASSES.contains(&name) {
            return Some(name.to_string());
        }
        rest = &after[end + 2..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_as_fnmatch_without_flags() {
        for (pattern, name, expected) in [
            ("CN=laptop", "CN=laptop", true),
            ("CN=laptop", "CN=laptop2", false),
            ("*", "", true),
            ("*", "anything, at all/here", true),
            ("CN=*,O=Example", "CN=a,b,O=Example", true),
            ("*CN=fred", "O=x,CN=fred", true),
            ("*CN=fred", "O=x,CN=fred,OU=y", false),
            ("CN=?", "CN=a", true),
            ("CN=?", "CN=ab", false),
            ("CN=[abc]*", "CN=bob", true),
            ("CN=[!abc]*", "CN=bob", false),
            ("CN=[^abc]*", "CN=dan", true),
            ("CN=[a-c]", "CN=b", true),
            ("CN=[a-c]", "CN=d", false),
            ("CN=[]x]", "CN=]", true),
            ("CN=[a-]", "CN=-", true),
            ("CN=[[:digit:]]x", "CN=7x", true),
            ("CN=[[:digit:]]x", "CN=ax", false),
            ("CN=[", "CN=[", true),
            ("CN=[ab", "CN=[ab", true),
            // A backslash makes the next character itself, so a DN's own escape needs doubling.
            ("O=Example\\, Org", "O=Example, Org", true),
            ("O=Example\\, Org", "O=Example\\, Org", false),
            ("O=Example\\\\, Org", "O=Example\\, Org", true),
            ("\\*", "*", true),
            ("\\*", "x", false),
            ("[\\]]", "]", true),
            ("a\\", "a\\", false),
            (".*", ".x", true),
            ("*", ".hidden", true),
            ("a/*", "a/b/c", true),
            ("[[:alpha:]]", "é", true),
            ("[a-]]", "-]", true),
            ("[!]]", "x", true),
            ("[\\!a]", "!", true),
            ("*a*b*c*", "xxaxxbxxcxx", true),
            ("*a*b*c*", "xxaxxcxxbxx", false),
            ("CN=Ünï*", "CN=Ünïcode ☃", true),
            ("CN=Ünï?ode ☃", "CN=Ünïcode ☃", true),
        ] {
            assert_eq!(fnmatch(pattern, name), expected, "{pattern:?} against {name:?}");
        }
    }

    #[test]
    fn unknown_classes_are_found() {
        assert_eq!(unknown_class("CN=[[:digit:]][[:alpha:]]"), None);
        assert_eq!(unknown_class("CN=[[:digits:]]"), Some("digits".into()));
        assert_eq!(unknown_class("no classes [here]"), None);
    }

    #[test]
    fn long_names_and_many_stars_stay_quick() {
        let name = "a".repeat(4096);
        let pattern = format!("{}b", "*a".repeat(64));
        assert!(!fnmatch(&pattern, &name));
    }
}
