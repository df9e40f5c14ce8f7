#!/usr/bin/env python3
"""Write the hand-made seeds in fuzz/seeds/<target>/: well-formed sessions that reach each phase.

cargo test asserts on these (they must reach transmission, decode requests...); the fuzzers start
from them (`cargo fuzz run TARGET corpus/TARGET seeds/TARGET`) and grow fuzz/corpus/.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
IHAVEOPT = 0x49484156454F5054


def opt(o, d=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(d)) + d


def info(name, reqs=()):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(reqs)) + b"".join(struct.pack(">H", r) for r in reqs)


def meta(name, qs):
    n = name.encode()
    body = b"".join(struct.pack(">I", len(q)) + q.encode() for q in qs)
    return struct.pack(">I", len(n)) + n + struct.pack(">I", len(qs)) + body


def req(t, cookie, off, ln, flags=0):
    return struct.pack(">IHHQQI", 0x25609513, flags, t, cookie, off, ln)


def xreq(t, cookie, off, ln, flags=0):
    return struct.pack(">IHHQQQ", 0x21E41C71, flags, t, cookie, off, ln)


def chunk(f, t, c, p):
    return struct.pack(">IHHQI", 0x668E33EF, f, t, c, len(p)) + p


def xchunk(f, t, c, p):
    return struct.pack(">IHHQQQ", 0x6E8A278C, f, t, c, 0, len(p)) + p


FLAGS = struct.pack(">I", 3)
SEEDS = {
    "nbd_handshake": {
        "go_simple": FLAGS + opt(7, info("fuzz", [3])) + req(0, 1, 0, 4096) + req(1, 2, 0, 4) + b"abcd"
        + req(3, 3, 0, 0) + req(2, 4, 0, 0),
        "structured_meta_go": FLAGS + opt(8) + opt(10, meta("fuzz", ["base:allocation"])) + opt(7, info("fuzz"))
        + req(7, 1, 0, 65536, 8) + req(0, 2, 0, 512, 4),
        "extended_go": FLAGS + opt(11) + opt(10, meta("fuzz", ["base:allocation"])) + opt(7, info("fuzz", [1, 2, 3]))
        + xreq(7, 1, 0, 1 << 40) + xreq(6, 2, 0, 4096, 0x12) + xreq(4, 3, 0, 4096),
        "export_name": FLAGS + opt(1, b"fuzz") + req(0, 1, 0, 16),
        "list_info_abort": FLAGS + opt(3) + opt(6, info("fuzz")) + opt(9, meta("fuzz", [])) + opt(5)
        + opt(999, b"x") + opt(2),
        "bad_lengths": FLAGS + opt(7, b"\xff\xff\xff\xff") + opt(10, b"\0\0\0\0\xff\xff\xff\xff")
        + opt(7, info("fuzz")) + req(0, 1, 0, 512),
        "oversized_write": FLAGS + opt(7, info("fuzz")) + req(1, 1, 0, 1 << 30),
        # STARTTLS (refused without TLS; with TLS required, the upgrade), again (refused either
        # way), then GO: transmission in both modes.
        "starttls_go": FLAGS + opt(5) + opt(5) + opt(7, info("fuzz")) + req(0, 1, 0, 4096),
    },
    "nbd_requests": {
        "compact_mix": b"\x02" + req(0, 1, 0, 4096) + req(1, 2, 4096, 8) + b"12345678" + req(4, 3, 0, 1 << 20)
        + req(6, 4, 0, 512, 0x12) + req(7, 5, 0, 1 << 20, 8) + req(5, 6, 0, 4096) + req(99, 7, 0, 0),
        "extended_mix": b"\x03" + xreq(0, 1, 0, 4096) + xreq(1, 2, 0, 4, 0x20) + b"wxyz"
        + xreq(7, 3, 0, 1 << 40, 0x20) + xreq(6, 4, 0, 1 << 33),
        "readonly": b"\x04" + req(1, 1, 0, 2) + b"hi" + req(4, 2, 0, 4096),
        "out_of_range": b"\x02" + req(0, 1, (1 << 64) - 1, 4096) + req(1, 2, (1 << 20) - 1, 2) + b"xx",
    },
    "nbd_replies": {
        "simple": struct.pack(">IIQ", 0x67446698, 0, 1) + struct.pack(">IIQ", 0x67446698, 22, 2),
        "structured": chunk(0, 1, 1, struct.pack(">Q", 0) + b"data") + chunk(0, 2, 1, struct.pack(">QI", 4, 512))
        + chunk(1, 5, 2, struct.pack(">III", 1, 4096, 3)) + chunk(1, 0x8001, 3, struct.pack(">IH", 22, 3) + b"bad"),
        "extended": xchunk(1, 6, 1, struct.pack(">IIQQ", 1, 1, 1 << 40, 0)) + xchunk(1, 0, 2, b""),
        # One chunk per request kind the fuzz entry rotates through (read of 64 KiB at 1 MiB,
        # block status, other), then again: data and hole placed in the read, ERROR_OFFSET.
        "judged": chunk(0, 1, 1, struct.pack(">Q", 1 << 20) + b"data") + chunk(1, 5, 2, struct.pack(">III", 1, 4096, 0))
        + chunk(1, 0x8002, 3, struct.pack(">IH", 5, 2) + b"io" + struct.pack(">Q", 7))
        + chunk(1, 2, 1, struct.pack(">QI", (1 << 20) + 4, 100)) + chunk(1, 1, 2, struct.pack(">Q", 0) + b"x")
        + chunk(1, 0, 3, b""),
    },
}

def qcow2_seeds():
    """Small images qemu-img writes, in several variants (needs qemu-img and qemu-io)."""
    import shutil
    import subprocess
    import tempfile

    if not shutil.which("qemu-img"):
        return {}
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for name, opts in [
            ("default", "cluster_size=512"),
            ("v2", "cluster_size=512,compat=0.10"),
            ("extl2", "cluster_size=16384,extended_l2=on"),
            ("rc1", "cluster_size=512,refcount_bits=1"),
            ("backed", "cluster_size=512,backing_file=base.qcow2,backing_fmt=qcow2"),
        ]:
            p = os.path.join(d, name + ".qcow2")
            if name == "backed":
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", os.path.join(d, "base.qcow2"), "64k"], check=True)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, "64k"], check=True)
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 3k", "-c", "write -z 8k 1k", "-c", "write -P 0x22 40k 2k", p],
                           check=True, stdout=subprocess.DEVNULL)
            with open(p, "rb") as f:
                out[name] = f.read()
        # Persistent dirty bitmaps (what `Image::bitmaps` and `bitmap_runs` parse): one at the
        # finest granularity, one at the default, bits set by qemu-io's writes.
        p = os.path.join(d, "bitmaps.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "64k"], check=True)
        subprocess.run(["qemu-img", "bitmap", "--add", "--granularity", "512", p, "b0"], check=True)
        subprocess.run(["qemu-img", "bitmap", "--add", p, "b1"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 4k 1k", "-c", "write -P 0x44 50k 3k", p],
                       check=True, stdout=subprocess.DEVNULL)
        with open(p, "rb") as f:
            out["bitmaps"] = f.read()
        p = os.path.join(d, "compressed.qcow2")
        raw = os.path.join(d, "src.raw")
        with open(raw, "wb") as f:
            f.write(bytes(i % 7 for i in range(65536)))
        subprocess.run(["qemu-img", "convert", "-q", "-c", "-O", "qcow2", "-o", "cluster_size=4096", raw, p], check=True)
        with open(p, "rb") as f:
            out["compressed"] = f.read()
    out.update(hostile_seeds(out.get("default")))
    return out


def hostile_seeds(default):
    """The default image with one header or table field made hostile, one seed per class of
    fault the library must answer with an error (never a panic, an overflow or silent data)."""
    if default is None:
        return {}
    import struct as st

    def patched(at, fmt, value, base=default):
        b = bytearray(base)
        st.pack_into(fmt, b, at, value)
        return bytes(b)

    l1_offset = st.unpack_from(">Q", default, 40)[0]
    return {
        # refcount_table_offset + its size overflows u64.
        "hostile_refcount_offset": patched(48, ">Q", 0xFFFF_FFFF_FFFF_FE00),
        # l1_table_offset + l1_size * 8 overflows u64.
        "hostile_l1_offset": patched(40, ">Q", 0xFFFF_FFFF_FFFF_FE00),
        # The dirty bit (refcounts rebuilt on a writable open) with the first L1 entry pointing
        # at an L2 table near the top of the address space: repair's range arithmetic overflows.
        "hostile_dirty_l2": patched(l1_offset, ">Q", (1 << 63) | 0x00FF_FFFF_FFFF_FE00,
                                    patched(72, ">Q", 1)),
    }


SEEDS["qcow2_image"] = qcow2_seeds()

# node_inputs: the first byte is the kind of input (node/src/fuzzing.rs). Block and resume map
# seeds (kinds 1 and 5) need BLAKE3, which Python lacks: the node writes them itself, with
# `NODE_WRITE_MAP_SEEDS=1 cargo test -p node --test fuzz_corpus block_maps`.
SEEDS["node_inputs"] = {
    "targets_two": b"\x00" + b"2000:nbd://127.0.0.1:10100/pgtest1-disk0, 2001:nbd://127.0.0.1:10101/pgtest1-disk1",
    "targets_ipv6_default_export": b"\x00" + b"2000:nbd://[::1]:10809",
    "targets_named_host": b"\x00" + b"2002:nbd://hub.example.net:10100/vm-disk2,2003:nbd://hub.example.net:10101/",
    "vm_two_disks": b"\x02" + b"db=2000:/var/lib/vm/db.raw,2001:qcow2:/var/lib/vm/db-1.qcow2",
    "vm_nbd_source": b"\x02" + b"web=2000:nbd://127.0.0.1:10809/web,2001:raw:/dev/vg/web1",
    "size_mib": b"\x03" + b"100M",
    "size_fraction": b"\x03" + b"1.5G",
    "size_bytes": b"\x03" + b"65536",
    "checksum": b"\x04" + b"blake3-blocks/65536:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
}

# hub_api (hub/src/fuzzing.rs): method byte (0 GET, 1 POST, 2 DELETE; 0x80: with the token),
# the path up to a newline, the body. Each is named after the status the fuzzed hub answers.
GET, POST, DELETE, AUTH = 0, 1, 2, 0x80
FULL, INCREMENTAL = b"b-20261201T010000-f00001", b"b-20261201T020000-f00002"
SEEDS["hub_api"] = {
    "200_health": bytes([GET]) + b"/healthz",
    "401_no_token": bytes([GET]) + b"/api/v1/backups",
    "200_list_backups": bytes([GET | AUTH]) + b"/api/v1/backups?vm_name=pgtest1&tag=nightly",
    "404_unknown_backup": bytes([GET | AUTH]) + b"/api/v1/backups/b-20261201T000000-abcdef",
    "404_delete_unknown_merging": bytes([DELETE | AUTH]) + b"/api/v1/backups/b-1?merge=true",
    "400_delete_bad_query": bytes([DELETE | AUTH]) + b"/api/v1/backups/b-1?merge=maybe",
    "503_backup_node_unreachable": bytes([POST | AUTH]) + b'/api/v1/backups\n{"vm_name": "pgtest1", "backup_type": "full", "tags": ["nightly"], "keep": 3}',
    "400_backup_unknown_field": bytes([POST | AUTH]) + b'/api/v1/backups\n{"vm_name": "pgtest1", "backup_type": "full", "colour": "red"}',
    "400_backup_bad_tag": bytes([POST | AUTH]) + b'/api/v1/backups\n{"vm_name": "pgtest1", "backup_type": "incremental", "tags": ["../x"]}',
    "404_restore_unknown": bytes([POST | AUTH]) + b'/api/v1/restores\n{"backup_id": "b-1"}',
    "200_prune_dry_run": bytes([POST | AUTH]) + b'/api/v1/prune\n{"keep": 2, "keep_daily": 7, "dry_run": true}',
    "503_replication_node_unreachable": bytes([POST | AUTH]) + b'/api/v1/replications\n{"vm_name": "pgtest1"}',
    "404_unknown_schedule": bytes([POST | AUTH]) + b"/api/v1/schedules/weekly/run",
    "200_ports": bytes([GET | AUTH]) + b"/api/v1/ports",
    "200_metrics": bytes([GET | AUTH]) + b"/metrics",
    "404_no_endpoint": bytes([GET | AUTH]) + b"/api/v2/everything",
    "400_id_not_utf8": bytes([DELETE | AUTH]) + b"/api/v1/backups/b%e1%ff",
    "405_delete_all_backups": bytes([DELETE | AUTH]) + b"/api/v1/backups",
    # The repository's chain (hub::fuzzing::FULL and INCREMENTAL of vm1) and its schedule.
    "200_get_full": bytes([GET | AUTH]) + b"/api/v1/backups/" + FULL,
    "200_list_vm": bytes([GET | AUTH]) + b"/api/v1/backups?vm_name=vm1",
    "201_restore_incremental": bytes([POST | AUTH]) + b'/api/v1/restores\n{"backup_id": "' + INCREMENTAL + b'"}',
    "503_restore_onto_node_unreachable": bytes([POST | AUTH]) + b'/api/v1/restores\n{"backup_id": "' + FULL
    + b'", "node": "node1", "destinations": {"2000": "/var/lib/vms/vm1-restored.qcow2"}}',
    "400_restore_node_without_destinations": bytes([POST | AUTH]) + b'/api/v1/restores\n{"backup_id": "' + FULL
    + b'", "node": "node1"}',
    "200_verify_full": bytes([POST | AUTH]) + b"/api/v1/backups/" + FULL + b"/verify",
    "200_verify_incremental": bytes([POST | AUTH]) + b"/api/v1/backups/" + INCREMENTAL + b"/verify",
    "200_delete_incremental": bytes([DELETE | AUTH]) + b"/api/v1/backups/" + INCREMENTAL,
    "409_delete_full_under_incremental": bytes([DELETE | AUTH]) + b"/api/v1/backups/" + FULL,
    "200_merge_full": bytes([DELETE | AUTH]) + b"/api/v1/backups/" + FULL + b"?merge=true",
    "200_prune_keep_one": bytes([POST | AUTH]) + b'/api/v1/prune\n{"vm_name": "vm1", "keep": 1}',
    "503_incremental_node_unreachable": bytes([POST | AUTH]) + b'/api/v1/backups\n{"vm_name": "vm1", "backup_type": "incremental"}',
    "200_get_schedule": bytes([GET | AUTH]) + b"/api/v1/schedules/nightly",
    "202_run_schedule": bytes([POST | AUTH]) + b"/api/v1/schedules/nightly/run",
}

# node_api (node/src/fuzzing/api.rs), the same request format as hub_api; requests of one input
# separated by 0x1e, @DIR@ standing for the node's directory. Named after the last request's status.
SEP = b"\x1e"
BACKUP = b'/api/v1/backup/start\n{"vm_name": "vm1", "nbd_targets": "2000:nbd://127.0.0.1:9/vm1-disk0", "job_id": "job1", "backup_type": "full"}'
START = bytes([POST | AUTH]) + BACKUP
SEEDS["node_api"] = {
    "200_health": bytes([GET]) + b"/healthz",
    "401_no_token": bytes([GET]) + b"/api/v1/vms",
    "200_vms": bytes([GET | AUTH]) + b"/api/v1/vms",
    "200_vm_raw": bytes([GET | AUTH]) + b"/api/v1/vms/vm1",
    "200_vm_qcow2": bytes([GET | AUTH]) + b"/api/v1/vms/vm2",
    "404_unknown_vm": bytes([GET | AUTH]) + b"/api/v1/vms/vm9",
    "202_backup": START,
    "400_backup_target_elsewhere": bytes([POST | AUTH]) + b'/api/v1/backup/start\n{"vm_name": "vm1", "nbd_targets": "2000:nbd://203.0.113.7:10100/vm1-disk0", "job_id": "job1", "backup_type": "full"}',
    "400_backup_unknown_field": bytes([POST | AUTH]) + b'/api/v1/backup/start\n{"vm_name": "vm1", "nbd_targets": "", "job_id": "job1", "backup_type": "full", "colour": "red"}',
    "404_backup_unknown_vm": bytes([POST | AUTH]) + b'/api/v1/backup/start\n{"vm_name": "vm9", "nbd_targets": "2000:nbd://127.0.0.1:9/vm9-disk0", "job_id": "job1", "backup_type": "full"}',
    "202_replicate": bytes([POST | AUTH]) + b'/api/v1/replicate\n{"vm_name": "vm2", "nbd_targets": "2000:nbd://127.0.0.1:9/vm2-disk0", "job_id": "rep1", "backup_type": "incremental"}',
    "202_restore_into_restore_dir": bytes([POST | AUTH]) + b'/api/v1/restore/start\n{"job_id": "r1", "nbd_targets": "2000:nbd://127.0.0.1:9/vm1-r1-disk0", "destinations": {"2000": "@DIR@/restores/vm1.raw"}}',
    "202_restore_onto_vm_disk": bytes([POST | AUTH]) + b'/api/v1/restore/start\n{"job_id": "r1", "nbd_targets": "2000:nbd://127.0.0.1:9/vm2-r1-disk0", "destinations": {"2000": "@DIR@/vm2-disk0.qcow2"}}',
    "400_restore_outside": bytes([POST | AUTH]) + b'/api/v1/restore/start\n{"job_id": "r1", "nbd_targets": "2000:nbd://127.0.0.1:9/x", "destinations": {"2000": "/etc/passwd"}}',
    "200_backup_then_view": START + SEP + bytes([GET | AUTH]) + b"/api/v1/backup/job1",
    "409_backup_twice": START + SEP + START,
    "200_backup_then_cancel": START + SEP + bytes([DELETE | AUTH]) + b"/api/v1/backup/job1",
    "200_backup_then_jobs": START + SEP + bytes([GET | AUTH]) + b"/api/v1/jobs",
    "409_commit_before_the_end": START + SEP + bytes([POST | AUTH]) + b"/api/v1/backup/job1/commit",
    "404_unknown_job": bytes([GET | AUTH]) + b"/api/v1/backup/nojob",
    "200_tunnel": bytes([GET | AUTH]) + b"/api/v1/tunnel",
    "200_metrics": bytes([GET | AUTH]) + b"/metrics",
    "405_delete_vms": bytes([DELETE | AUTH]) + b"/api/v1/vms",
    "400_id_not_utf8": bytes([GET | AUTH]) + b"/api/v1/backup/j%e1%ff",
}

# tunnel_inputs (tunnel/src/fuzzing.rs): 0 authorized_keys, 1 range, 2 forward, 3 reverse.
KEY = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb8qoqZtrb2+TCr0jq9UPZ+N7cSMQfDg+XKQ1uQ5fN0 node@host"
SEEDS["tunnel_inputs"] = {
    "keys_plain": b"\x00# the node\n" + KEY + b"\n",
    "keys_fenced": b"\x00" + b'restrict,port-forwarding,from="10.0.0.*,!10.0.0.9",permitopen="127.0.0.1:10100",'
    + b'permitopen="127.0.0.1:8082",permitlisten="127.0.0.1:9081" ' + KEY + b"\n",
    "keys_expiring": b"\x00" + b'no-pty,no-agent-forwarding,expiry-time="20991231235959",command="true" ' + KEY + b"\n"
    + b"no-port-forwarding " + KEY + b"\n",
    "range_production": b"\x01" + b"10100-10200",
    "range_moved": b"\x01" + b"20100-20102:10100",
    "forward_api": b"\x02" + b"8082",
    "forward_moved": b"\x02" + b"18082:8082",
    "reverse_api": b"\x03" + b"9081:8081",
}

for target, seeds in SEEDS.items():
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
