//! The process's allowance of open descriptors, raised to what the system lets it have.
//!
//! A service that embeds this crate holds a descriptor per connection, two per pipe of the
//! spliced write path, and one per image of every chain it serves (a backup hub: up to 101
//! exports, each an overlay on a chain of up to 256 images). Started from a shell or a unit
//! without `LimitNOFILE`, a process gets a soft limit of 1024 while the hard limit is usually
//! far higher; the soft limit exists for programs that still use `select(2)`, which nothing here
//! does (tokio waits with epoll). So the binaries raise the soft limit to the hard one at start,
//! as Go's runtime and systemd's own services do, and an operator's lower hard limit still holds.

/// Raise the soft limit on open descriptors to the hard limit; returns the soft limit now in
/// force (unchanged when already at the hard limit, or `None` when unlimited).
///
/// # Errors
/// The kernel refuses the new limit.
pub fn raise_limit() -> std::io::Result<Option<u64>> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return Ok(limit.current);
    }
    let raised = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
    setrlimit(Resource::Nofile, raised).map_err(std::io::Error::from)?;
    Ok(limit.maximum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one_and_stays_within_it() {
        use rustix::process::{getrlimit, Resource};
        let before = getrlimit(Resource::Nofile);
        let now = raise_limit().expect("raising to the hard limit is always allowed");
        let after = getrlimit(Resource::Nofile);
        assert_eq!((now, after.current, after.maximum), (before.maximum, before.maximum, before.maximum));
        assert_eq!(raise_limit().unwrap(), now, "raising again changes nothing");
    }
}
