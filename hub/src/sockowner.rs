//! Which local user holds the other end of a TCP connection from this machine, from
//! `/proc/net/tcp` and `/proc/net/tcp6`.
//!
//! A client on this machine connects from a socket the kernel lists with its owner's uid: the
//! entry whose local address is the client's address and whose remote port is the export's; a
//! client on another machine has none. That
//! is how the hub tells a leased port's legitimate local clients (sshd forwarding for a node's
//! login user, an operator's `nbdcopy`) from any other account on the hub. Reading the table
//! needs no privilege and no `unsafe` (`SO_PEERCRED` is for Unix sockets only); a client that is
//! gone by the time the table is read has no entry, and is refused.
//!
//! The table's addresses are hex words in the kernel's byte order: IPv4 one little-endian `u32`,
//! IPv6 four of them; ports are big-endian hex. Lines that do not parse are skipped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The uid owning the client socket `client` connected to local port `server_port`, if the
/// kernel lists one (the client is on this machine).
pub fn local_client_uid(client: SocketAddr, server_port: u16) -> Option<u32> {
    let want = SocketAddr::new(client.ip().to_canonical(), client.port());
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(table).ok()?;
        uid_in_table(&text, want, server_port)
    })
}

/// [`local_client_uid`] over the text of one table.
fn uid_in_table(table: &str, client: SocketAddr, server_port: u16) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local = parse_endpoint(fields.get(1)?)?;
        let remote = parse_endpoint(fields.get(2)?)?;
        let uid = fields.get(7)?.parse().ok()?;
        (local == client && remote.port() == server_port).then_some(uid)
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), as the kernel prints them.
fn parse_endpoint(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(u32::from_str_radix(addr, 16).ok()?.swap_bytes())),
        32 => {
            let mut octets = [0u8; 16];
            for (i, chunk) in octets.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.swap_bytes().to_be_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip.to_canonical(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_notation_parses_and_junk_does_not() {
        assert_eq!(parse_endpoint("0100007F:1F90"), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(parse_endpoint("00000000000000000000000001000000:0050"), Some("[::1]:80".parse().unwrap()));
        // ::ffff:127.0.0.1, a v4 client of a dual-stack listener, reads as 127.0.0.1.
        assert_eq!(parse_endpoint("0000000000000000FFFF00000100007F:0050"), Some("127.0.0.1:80".parse().unwrap()));
        for junk in ["", ":", "0100007F", "0100007G:0050", "0100007F:10000", "01:0050", "é100007F:0050"] {
            assert_eq!(parse_endpoint(junk), None, "{junk}");
        }
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n\
                     0: 0100007F:D431 0100007F:2774 01 00000000:00000000 00:00000000 00000000  1000  0 1\n\
                     1: garbage\n";
        assert_eq!(uid_in_table(table, "127.0.0.1:54321".parse().unwrap(), 10100), Some(1000));
        assert_eq!(uid_in_table(table, "127.0.0.1:54321".parse().unwrap(), 10101), None);
        assert_eq!(uid_in_table(table, "127.0.0.1:54322".parse().unwrap(), 10100), None);
    }

    #[test]
    fn a_loopback_client_is_owned_by_this_process_user() {
        let me = rustix::process::geteuid().as_raw();
        for host in ["127.0.0.1", "::1"] {
            let Ok(listener) = std::net::TcpListener::bind((host, 0)) else { continue };
            let port = listener.local_addr().unwrap().port();
            let client = std::net::TcpStream::connect((host, port)).unwrap();
            let (_served, peer) = listener.accept().unwrap();
            assert_eq!(peer, client.local_addr().unwrap());
            assert_eq!(local_client_uid(peer, port), Some(me), "{host}");
            drop(client);
        }
        assert_eq!(local_client_uid("127.0.0.1:1".parse().unwrap(), 1), None);
    }
}
