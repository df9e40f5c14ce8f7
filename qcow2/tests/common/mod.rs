//! What the qcow2 integration tests share: the qemu tools they are judged by.

#![allow(dead_code)]

use std::process::Command;

/// `name` from PATH; its absence fails the test (CI installs qemu-utils), never skips it.
pub fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()));
    match found {
        Some(p) => Command::new(p),
        None => panic!("{name} is required (qemu-utils); scripts/test.sh installs it"),
    }
}

/// Run `cmd`, which must succeed.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// `qemu-io -f qcow2 -c C1 -c C2 ... img`, which must succeed.
pub fn qemu_io(img: &std::path::Path, commands: &[&str]) {
    let mut cmd = tool("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run(cmd.arg(img));
}
