//! Whether another process holds a source disk open for writing, as a running VM's qemu does.
//!
//! Reading a disk that a VM is writing copies a disk that changes under the copy: blocks from
//! different moments, and for a qcow2 file, L2 tables read half-way through an update. The
//! backup then verifies (its checksum is of what was sent) and restores to a disk that may not
//! mount. qemu announces its writers: every process that opens an image with write permission
//! takes a shared OFD lock on byte 101 of the file (byte 100 + the bit of `BLK_PERM_WRITE`; qemu's
//! `raw_apply_lock_bytes`), which is how `qemu-img` knows to refuse with "Failed to get shared
//! 'write' lock". A VM whose disk was snapshotted (LVM, or libvirt's external snapshot, which
//! reopens the old file read-only) holds no such lock on what the node reads.
//!
//! The locks are read from `/proc/locks` rather than probed with `F_OFD_GETLK`: the workspace
//! allows no `unsafe`, and rustix offers no `F_OFD_GETLK`; the file names each lock's device,
//! inode and byte range, which is all this needs.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// qemu's lock byte for "some process holds write permission".
const QEMU_WRITE_LOCK_BYTE: u64 = 101;
/// qemu's permission lock bytes start here; a lock starting earlier is not qemu's.
const QEMU_LOCK_BASE: u64 = 100;
/// Read at most this much of `/proc/locks` (a line is ~60 bytes).
const LOCKS_LIMIT: u64 = 16 << 20;

/// True if a process holds `path` (a file or block device) open with write permission the way
/// qemu marks it.
///
/// # Errors
/// `path` cannot be examined, or `/proc/locks` cannot be read.
pub fn held_for_writing(path: &Path) -> std::io::Result<bool> {
    let meta = std::fs::metadata(path)?;
    let file = (rustix::fs::major(meta.dev()), rustix::fs::minor(meta.dev()), meta.ino());
    let mut locks = String::new();
    std::fs::File::open("/proc/locks")?.take(LOCKS_LIMIT).read_to_string(&mut locks)?;
    Ok(locks.lines().any(|line| holds_write_byte(line, file)))
}

/// One line of `/proc/locks` (`1: OFDLCK ADVISORY  READ -1 fe:00:10010655 100 101`): a granted
/// POSIX or OFD lock of `file` (major, minor, inode) over qemu's write byte.
fn holds_write_byte(line: &str, file: (u32, u32, u64)) -> bool {
    let fields: Vec<&str> = line.split_whitespace().collect();
    // "N: -> ..." lines are requests waiting for a lock, not locks held.
    let [_, class, _, _, _, id, start, end, ..] = fields.as_slice() else { return false };
    if !matches!(*class, "POSIX" | "OFDLCK") {
        return false;
    }
    let mut id = id.split(':');
    let same_file = match (id.next(), id.next(), id.next()) {
        (Some(major), Some(minor), Some(inode)) => {
            u32::from_str_radix(major, 16) == Ok(file.0)
                && u32::from_str_radix(minor, 16) == Ok(file.1)
                && inode.parse::<u64>() == Ok(file.2)
        }
        _ => false,
    };
    let (Ok(start), Some(end)) = (start.parse::<u64>(), if *end == "EOF" { Some(u64::MAX) } else { end.parse().ok() })
    else {
        return false;
    };
    same_file && (QEMU_LOCK_BASE..=QEMU_WRITE_LOCK_BYTE).contains(&start) && end >= QEMU_WRITE_LOCK_BYTE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_granted_lock_over_qemus_write_byte_of_this_file_counts() {
        let f = (0xfe, 0, 10010655);
        for (line, want) in [
            ("4: OFDLCK ADVISORY  READ -1 fe:00:10010655 100 101", true),
            ("4: POSIX  ADVISORY  READ 77 fe:00:10010655 101 101", true),
            ("4: OFDLCK ADVISORY  READ -1 fe:00:10010655 100 100", false), // a reader
            ("4: OFDLCK ADVISORY  READ -1 fe:00:10010655 201 201", false), // "no other writer"
            ("4: OFDLCK ADVISORY  READ -1 fe:00:10010656 100 101", false), // another file
            ("4: OFDLCK ADVISORY  READ -1 fd:00:10010655 100 101", false), // another device
            ("4: POSIX  ADVISORY  WRITE 3568 fe:00:10010655 0 EOF", false), // not qemu's
            ("4: FLOCK  ADVISORY  WRITE 3517 fe:00:10010655 0 EOF", false),
            ("4: -> OFDLCK ADVISORY  WRITE -1 fe:00:10010655 100 101", false),
            ("garbage", false),
            ("", false),
        ] {
            assert_eq!(holds_write_byte(line, f), want, "{line}");
        }
    }
}
