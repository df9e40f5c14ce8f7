//! Entry point of the `node_inputs` fuzz target (`fuzz/`) and of its corpus replay in `cargo
//! test`: the text and bytes that reach the node from outside, through the parsers the service
//! runs on them.
//!
//! The first byte says what the rest is:
//! - `0`: an `nbd_targets` list, as the hub's requests carry it ([`targets::parse`]);
//! - `1`: a block map or resume map file, as a crash or a damaged disk may leave it
//!   ([`BlockMap::from_bytes`], [`ResumeMap::from_bytes`]);
//! - `2`: a `--vm NAME=KEY:SOURCE,...` declaration ([`config::parse_vm_flag`], then the checks
//!   `node.toml`'s VMs go through, [`config::resolve_vms`]);
//! - `3`: a size or a rate (`request_size`, `block_size`, `bandwidth_limit`);
//! - `4`: a disk checksum as a node reports it to the hub, which verifies backups with the
//!   block size it names ([`checksum_block_size`]);
//! - `5`: a block map or resume map file without its trailer, which this entry appends (the
//!   BLAKE3 of the rest), so that the fuzzer reaches what the parsers check after the trailer
//!   (geometry, lengths, the finished blocks): as `1` it would have to forge the hash;
//! - `6`: the hub's block hashes of an incremental backup, what differs from its parent's
//!   ([`MapDiff::from_bytes`]), without its trailer as `5`.
//!
//! Besides never panicking, what a parser accepts must hold up: a target list prints back to
//! one that parses to the same targets, a block map writes back to the same map with one hash per
//! block (a resume map loads back, naming only blocks the disk has), a difference writes back to
//! itself and applies to no base but its own, a VM has a valid name and distinct disk keys, a size is more than
//! zero, a block size (of a map or a checksum) is one a copy makes ([`valid_block_size`]), never
//! one that asks for a buffer larger than 64 MiB. A broken property panics, which is what a fuzzer reports.

pub mod api;
pub mod api_requests;

use crate::blockmap::{block_count, checksum_block_size, valid_block_size, BlockMap, MapDiff, ResumeMap};
use crate::{config, targets};

/// What an input was taken for, and whether its parser accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The first byte, as the kind of input (`None`: no bytes, or a kind with no parser).
    pub kind: Option<u8>,
    /// The parser accepted the rest.
    pub accepted: bool,
}

/// Run one input (module doc).
pub fn input(data: &[u8]) -> Outcome {
    let Some((&kind, rest)) = data.split_first() else { return Outcome { kind: None, accepted: false } };
    let text = || String::from_utf8_lossy(rest);
    let accepted = match kind {
        0 => target_list(&text()),
        1 => block_map(rest),
        2 => vm_declaration(&text()),
        3 => size(&text()),
        4 => checksum_block_size(&text()).inspect(|b| assert!(valid_block_size(*b), "block size {b}")).is_some(),
        5 => block_map(&[rest, blake3::hash(rest).as_bytes()].concat()),
        6 => map_diff(&[rest, blake3::hash(rest).as_bytes()].concat()),
        _ => return Outcome { kind: None, accepted: false },
    };
    Outcome { kind: Some(kind), accepted }
}

#[allow(clippy::panic)]
fn target_list(text: &str) -> bool {
    let Ok(list) = targets::parse(text) else { return false };
    let printed: Vec<String> = list.iter().map(ToString::to_string).collect();
    let again = targets::parse(&printed.join(","));
    if again.as_ref() != Ok(&list) {
        panic!("{text:?} parsed to {list:?}, printed as {printed:?}, which parses to {again:?}");
    }
    for (i, t) in list.iter().enumerate() {
        assert!(t.port != 0 && !t.host.is_empty(), "{t:?}");
        assert!(list.iter().skip(i + 1).all(|o| o.key != t.key), "key {} twice", t.key);
    }
    true
}

fn block_map(bytes: &[u8]) -> bool {
    let resume = ResumeMap::from_bytes(bytes);
    if let Some(r) = &resume {
        let count = r.map.hashes.len() as u64;
        assert_eq!(count, block_count(r.map.disk_size, r.map.block_size));
        assert!(r.done.iter().all(|b| b < count), "a finished block the disk does not have");
        let again = r.to_bytes();
        assert!(
            ResumeMap::from_bytes(&again).is_some_and(|s| s.to_bytes() == again),
            "a resume map does not load back"
        );
    }
    let Some(map) = BlockMap::from_bytes(bytes) else { return resume.is_some() };
    assert_eq!(map.hashes.len() as u64, block_count(map.disk_size, map.block_size));
    assert!(valid_block_size(map.block_size), "block size {}", map.block_size);
    // Not always the same bytes: a map of the version before, or one storing a zero block's
    // hash, is written in today's form; but always the same map.
    assert!(BlockMap::from_bytes(&map.to_bytes()).as_ref() == Some(&map), "a loaded map does not load back");
    assert!(
        resume.is_some_and(|r| r.map == map && r.done.is_empty()),
        "a block map is a resume map with nothing finished"
    );
    true
}

fn map_diff(bytes: &[u8]) -> bool {
    let Some(diff) = MapDiff::from_bytes(bytes) else { return false };
    assert!(MapDiff::from_bytes(&diff.to_bytes()).as_ref() == Some(&diff), "a difference does not load back");
    let (disk_size, block_size) = diff.geometry();
    // A map of an empty disk: the base of a difference made against one, and of no other.
    let empty = BlockMap::zeroed(disk_size, block_size);
    let made_against_it = diff.made_against(&empty);
    let empty_digest = crate::blockmap::digest(&empty);
    // Made against it, it applies (its changed blocks are the disk's); otherwise never.
    assert_eq!(diff.apply_to(empty.clone(), &empty_digest).is_some(), made_against_it, "applied to another base");
    if let Some(map) = diff.apply(empty) {
        assert!(made_against_it && crate::blockmap::digest(&map) == diff.yields(), "yields another map than it says");
    }
    true
}

fn vm_declaration(text: &str) -> bool {
    let Ok(file) = config::parse_vm_flag(text) else { return false };
    let Ok(vms) = config::resolve_vms(vec![file]) else { return false };
    for vm in &vms {
        assert!(config::valid_name(&vm.name), "{:?}", vm.name);
        assert!(vm.disks.windows(2).all(|w| matches!(w, [a, b] if a.key < b.key)), "disk keys not distinct and sorted");
    }
    true
}

fn size(text: &str) -> bool {
    let Ok(n) = config::parse_size(text) else { return false };
    assert!(n > 0, "{text:?} accepted as a size of zero");
    true
}
