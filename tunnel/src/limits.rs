//! The memory an SSH peer can make the other side hold, and the settings that bound it.
//!
//! russh gives every channel a queue between its session loop and the task that forwards the
//! channel to TCP, and acknowledges data (window adjust) when it *arrives*, not when it is
//! consumed: the SSH window does not bound what waits in that queue. What does is the queue's
//! length — when a channel's queue is full the session loop waits, and the peer's data backs up
//! in TCP — times the largest message. russh itself accepts packets of up to 256 KiB whatever
//! maximum packet size was advertised, so both ends here also refuse (and disconnect) a peer
//! whose channel data exceeds the maximum they advertised, as RFC 4254 §5.2 requires of it.
//!
//! Worst case an authenticated peer can pin, with these settings:
//! - per channel: [`CHANNEL_QUEUE`] x the advertised maximum packet (endpoint
//!   [`ENDPOINT_MAX_PACKET`], 16 x 32 KiB = 512 KiB; client [`CLIENT_MAX_PACKET`],
//!   16 x 64 KiB = 1 MiB), plus the forwarding task's 64 KiB read buffer;
//! - per connection: the [`SSH_READ_BUFFER`] its socket is read through;
//! - per connection at the hub's endpoint: `max_channels_per_connection` (the hub uses 512)
//!   x 576 KiB = 288 MiB, and `max_connections_per_key` (8) of those per node key;
//! - the NBD server behind the forwards bounds itself (`ServerConfig::max_buffered_bytes` per
//!   connection and `max_buffered_bytes_total` for the process).
//!
//! In practice a channel holds far less: a queue fills only when the forward's destination stops
//! reading, and then the whole connection stalls rather than growing — every channel on it,
//! keepalives included, until that destination reads again. So a destination must never wait on
//! something the stalled connection itself carries: the hub's in-process NBD server gives a
//! write's byte budget back once the write is applied, not once its reply (which this connection
//! carries) is out, and waits for its disk off the runtime that runs the sessions.

/// Messages queued per channel between the SSH session and the channel's forwarding task.
pub const CHANNEL_QUEUE: usize = 16;

/// The largest channel data packet the hub's endpoint accepts (advertised to clients).
pub const ENDPOINT_MAX_PACKET: u32 = 32 * 1024;

/// The largest channel data packet the tunnel client accepts (advertised to the hub).
pub const CLIENT_MAX_PACKET: u32 = 64 * 1024 - 1;

/// Bytes taken from an SSH connection's socket per `recv`, at both ends. russh reads each
/// packet with two `read_exact`s (its length, then the rest): straight on the socket that is two
/// system calls per packet, and often a wake-up between them. Read through a buffer of this size
/// (writes pass straight through), one `recv` takes several packets: in a 4-connection NBD copy
/// through the standalone pair the endpoint made 5 000 `recv`s per GiB instead of 67 000, and
/// the pair ran 1.07-1.09x faster at 0.89x the CPU (the extra copy out of the buffer costs less
/// than the calls it saves). Fixed per connection, never grown by the peer.
pub const SSH_READ_BUFFER: usize = 256 * 1024;

/// Whether channel data of `len` bytes respects the advertised `max` (a peer that sends more
/// is broken or hostile, and is disconnected).
pub fn packet_within(len: usize, max: u32) -> bool {
    len <= max as usize
}
