//! Small file-system steps the node and the hub share: a record replaced whole, and a
//! directory only its owner can enter.
//!
//! Both services keep whole VM disks (backups, replicas, restored disks) and what describes
//! them, so the directories they make are `0700`: another local user could otherwise read every
//! backed-up machine's disk from a `0755` tree, whatever the files' own modes. A directory that
//! already exists keeps its mode: where the operator made it, the operator decided.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

/// Create `dir` and any missing parents, each `0700` (less nothing: the umask only removes
/// bits); an existing one is left as it is.
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
}
