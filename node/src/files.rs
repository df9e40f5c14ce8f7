//! Small file-system steps the node and the hub share: a record replaced whole, a directory
//! only its owner can enter, and a token file read only when it is its owner's alone.
//!
//! Both services keep whole VM disks (backups, replicas, restored disks) and what describes
//! them, so the directories they make are `0700`: another local user could otherwise read every
//! backed-up machine's disk from a `0755` tree, whatever the files' own modes. A directory that
//! already exists keeps its mode: where the operator made it, the operator decided.
//!
//! A token file is the API: whoever reads it can start restores and delete backups. It is
//! refused when the user running us owns it and lets others read or write it, the rule OpenSSH
//! applies to private keys and `tunnel::read_secret` to ours (a file another user owns is that
//! user's to protect).

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

/// The longest token file read.
const MAX_TOKEN_FILE: u64 = 4096;

/// Read an API token from `path`: trimmed, not empty, and only from a file that is its
/// owner's alone (`tunnel::read_secret`, the rule for private keys).
///
/// # Errors
/// It cannot be read, is empty or larger than any token, or others may read or write it.
pub fn read_token(path: &Path) -> Result<String, String> {
    let text = tunnel::read_secret(path, MAX_TOKEN_FILE, "token file").map_err(|e| e.to_string())?;
    match text.trim() {
        "" => Err(format!("token file {} is empty", path.display())),
        token => Ok(token.to_string()),
    }
}

/// Create `dir` and any missing parents, each `0700` (the umask can only take bits away); an
/// existing one is left as it is.
///
/// # Errors
/// A component cannot be created.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Write `data` to `path` so that a crash leaves the old file or the new one, never a mix
/// (its directory made private if missing).
///
/// # Errors
/// Any step failed.
pub fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_directories_are_private_and_existing_ones_keep_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        let record = shared.join("a").join("b").join("record.json");
        write_atomically(&record, b"{}").unwrap();
        assert_eq!(std::fs::read(&record).unwrap(), b"{}");
        assert_eq!((mode(&shared.join("a")), mode(&shared.join("a/b"))), (0o700, 0o700));
        create_private_dir(&shared).unwrap();
        assert_eq!(mode(&shared), 0o755, "the operator's directory is left as it was");
    }

    #[test]
    fn a_token_file_others_can_read_is_refused_and_a_private_one_read_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  abc123\n").unwrap();
        for open in [0o644, 0o640, 0o604, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(open)).unwrap();
            let err = read_token(&path).unwrap_err();
            assert!(err.contains(&format!("permissions {open:04o}")) && err.contains("chmod 600"), "{err}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&path).unwrap(), "abc123");
        std::fs::write(&path, "\n").unwrap();
        assert!(read_token(&path).unwrap_err().contains("is empty"));
        std::fs::write(&path, vec![b'a'; 5000]).unwrap();
        assert!(read_token(&path).unwrap_err().contains("larger than"));
        assert!(read_token(&dir.path().join("none")).unwrap_err().contains("cannot read"));
    }
}
