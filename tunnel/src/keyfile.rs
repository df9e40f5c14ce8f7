//! Private key files (the node's identity, the hub's host key) and authorized_keys, read as
//! OpenSSH reads them: a key file its owner has left readable or writable by others is refused,
//! and so is an authorized_keys file others may write (sshd's `StrictModes`).
//!
//! A key others on the machine can read is a key others can use to be the node, or the hub.
//! OpenSSH's `ssh` ignores such an identity and `sshd` such a host key ("UNPROTECTED PRIVATE KEY
//! FILE"); the tool that replaces them must not be the weaker one, so this refuses, with the
//! `chmod` that fixes it, rather than warning. As OpenSSH does, only a file owned by the user
//! running us is judged: a key another account keeps (read by root, say) is that account's to
//! protect. An authorized_keys file decides who may connect: whoever can write it can add a key,
//! so it must belong to us or root and be writable by nobody else, as sshd requires by default.
//! Files are read through a bound: no key file is larger than [`MAX_KEY_FILE`], no
//! authorized_keys larger than [`MAX_AUTHORIZED_KEYS_FILE`].

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use russh::keys::PrivateKey;

/// The longest key file read (an OpenSSH RSA 16384-bit key is under 13 KiB).
pub const MAX_KEY_FILE: u64 = 64 << 10;

/// The longest authorized_keys file read (thousands of keys).
pub const MAX_AUTHORIZED_KEYS_FILE: u64 = 1 << 20;

/// A private key, secret or authorized_keys file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Opening or reading it failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Its owner (the user running us) lets others read or write it.
    #[error(
        "permissions {mode:04o} for {what} {path} are too open: it must be its owner's alone, as OpenSSH \
         requires of private keys (chmod 600 {path})"
    )]
    TooOpen {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
        /// What it holds.
        what: &'static str,
    },
    /// Larger than any such file.
    #[error("{path} is larger than {limit} bytes: not a {what} file")]
    TooLarge {
        /// The file.
        path: String,
        /// The bound.
        limit: u64,
        /// What it should have been.
        what: &'static str,
    },
    /// An authorized_keys file someone else may write (or that someone else owns).
    #[error(
        "authorized keys {path} could be changed by others ({why}): whoever writes it can add a key and connect, \
         and sshd's StrictModes refuses it too ({fix})"
    )]
    OpenToOthers {
        /// The file.
        path: String,
        /// Its owner or mode, as found.
        why: String,
        /// The command that fixes it.
        fix: String,
    },
    /// Not an unencrypted private key russh reads.
    #[error("{path} is not a usable private key: {reason}")]
    Decode {
        /// The file.
        path: String,
        /// russh's reason.
        reason: String,
    },
}

/// Load the unencrypted private key at `path` (OpenSSH, PKCS#8 or PEM), refusing a file that
/// its owner, the user running us, lets others read or write.
///
/// # Errors
/// See [`KeyFileError`].
pub fn load_private_key(path: &Path) -> Result<PrivateKey, KeyFileError> {
    let text = read_secret(path, MAX_KEY_FILE, "private key")?;
    russh::keys::decode_secret_key(&text, None)
        .map_err(|e| KeyFileError::Decode { path: path.display().to_string(), reason: e.to_string() })
}

/// The text of a secret file (a private key, an API token) of at most `limit` bytes, refused
/// when its owner, the user running us, lets others read or write it; `what` names it in errors.
///
/// # Errors
/// See [`KeyFileError`].
pub fn read_secret(path: &Path, limit: u64, what: &'static str) -> Result<String, KeyFileError> {
    let read = |source| KeyFileError::Read { path: path.display().to_string(), source };
    let file = std::fs::File::open(path).map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    let mode = meta.mode() & 0o7777;
    if meta.uid() == rustix::process::getuid().as_raw() && mode & 0o077 != 0 {
        return Err(KeyFileError::TooOpen { path: path.display().to_string(), mode, what });
    }
    read_bounded(file, path, limit, what)
}

/// The text of the authorized_keys file at `path`, refused when it belongs to someone other
/// than us or root, or others may write it.
///
/// # Errors
/// See [`KeyFileError`].
pub fn read_authorized_keys(path: &Path) -> Result<String, KeyFileError> {
    let shown = || path.display().to_string();
    let read = |source| KeyFileError::Read { path: shown(), source };
    let file = std::fs::File::open(path).map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    let mode = meta.mode() & 0o7777;
    let us = rustix::process::getuid().as_raw();
    if meta.uid() != us && meta.uid() != 0 {
        let (why, fix) = (format!("owned by uid {}", meta.uid()), format!("chown {us} {}", shown()));
        return Err(KeyFileError::OpenToOthers { path: shown(), why, fix });
    }
    if mode & 0o022 != 0 {
        let (why, fix) = (format!("mode {mode:04o}"), format!("chmod go-w {}", shown()));
        return Err(KeyFileError::OpenToOthers { path: shown(), why, fix });
    }
    read_bounded(file, path, MAX_AUTHORIZED_KEYS_FILE, "authorized_keys")
}

/// The whole of `file` as text, if it is at most `limit` bytes.
fn read_bounded(file: std::fs::File, path: &Path, limit: u64, what: &'static str) -> Result<String, KeyFileError> {
    let mut text = String::new();
    file.take(limit + 1)
        .read_to_string(&mut text)
        .map_err(|source| KeyFileError::Read { path: path.display().to_string(), source })?;
    if text.len() as u64 > limit {
        return Err(KeyFileError::TooLarge { path: path.display().to_string(), limit, what });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A new Ed25519 key (by OpenSSH's `ssh-keygen`) at mode `mode`.
    fn key_file(dir: &Path, mode: u32) -> std::path::PathBuf {
        let path = dir.join(format!("key-{mode:o}"));
        let made = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&path)
            .status()
            .expect("ssh-keygen (openssh-client) must be installed");
        assert!(made.success());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_key_its_owner_lets_others_read_is_refused_as_openssh_refuses_it() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_private_key(&key_file(dir.path(), 0o600)).is_ok());
        assert!(load_private_key(&key_file(dir.path(), 0o400)).is_ok());
        for mode in [0o644, 0o640, 0o604, 0o620] {
            let path = key_file(dir.path(), mode);
            let err = load_private_key(&path).unwrap_err().to_string();
            assert!(err.contains(&format!("permissions {mode:04o}")) && err.contains("chmod 600"), "{err}");
        }
    }

    #[test]
    fn a_file_that_is_no_key_or_too_large_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = load_private_key(&dir.path().join("none")).unwrap_err().to_string();
        assert!(missing.contains("cannot read"), "{missing}");
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"not a key").unwrap();
        std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(load_private_key(&junk), Err(KeyFileError::Decode { .. })));
        let large = dir.path().join("large");
        std::fs::write(&large, vec![b'A'; (MAX_KEY_FILE + 1) as usize]).unwrap();
        std::fs::set_permissions(&large, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(load_private_key(&large), Err(KeyFileError::TooLarge { .. })));
    }

    #[test]
    fn authorized_keys_others_may_write_are_refused_as_sshd_refuses_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_keys");
        std::fs::write(&path, "ssh-ed25519 AAAA x\n").unwrap();
        for mode in [0o644, 0o600, 0o640, 0o444] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(read_authorized_keys(&path).unwrap(), "ssh-ed25519 AAAA x\n", "{mode:o}");
        }
        for mode in [0o664, 0o646, 0o666] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = read_authorized_keys(&path).unwrap_err().to_string();
            assert!(err.contains(&format!("mode {mode:04o}")) && err.contains("chmod go-w"), "{err}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&path, vec![b'#'; (MAX_AUTHORIZED_KEYS_FILE + 1) as usize]).unwrap();
        assert!(matches!(read_authorized_keys(&path), Err(KeyFileError::TooLarge { .. })));
    }
}
