//! Small file-system steps the node and the hub share: a record replaced whole, a restored disk
//! put in its file's place only once it is whole, a directory only its owner can enter, and a
//! token file read only when it is its owner's alone.
//!
//! A restore into a regular file writes a new file beside it and renames it over the old one
//! when the last byte is durable ([`Replacement`]): a restore that fails, is cancelled, or dies
//! with the node leaves the VM its previous disk rather than a disk half old, half new. It costs
//! the space of the data restored until the rename. The new file takes the old one's mode and
//! owner (a VM's disk is often its hypervisor user's); a symlink is followed, so the file it
//! names is replaced and the link stays. A block device is written in place: it has no beside.
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

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

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
/// (its directory made private if missing). The file is `0600`, as the disks it describes
/// (manifests, block hashes, change-tracking maps, records of runs under way).
///
/// # Errors
/// Any step failed.
pub fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_atomically_with(path, |f| f.write_all(data))
}

/// As [`write_atomically`], the contents written by `write` as it goes (through a buffer), so a
/// large file need not be whole in memory first.
///
/// # Errors
/// Any step failed, `write` included.
pub fn write_atomically_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    Staged::write(path, write)?.commit()
}

/// A file written whole and durable beside `path` (`.NAME.tmp`), put in its place by
/// [`Staged::commit`]: the steps of [`write_atomically_with`] for a caller with one more step to
/// take between writing and replacing (a checkpoint flushes the target its map describes). Removed
/// if dropped uncommitted.
#[derive(Debug)]
pub struct Staged {
    path: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

impl Staged {
    /// Write the file beside `path` (its directory made private if missing), `0600`, and fsync it.
    ///
    /// # Errors
    /// Any step failed, `write` included (nothing is left beside).
    pub fn write(path: &Path, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> std::io::Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        create_private_dir(dir)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp"));
        // One a crash left keeps its mode if opened again: made anew, the mode below applies.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let staged = Self { path: path.to_path_buf(), tmp, committed: false };
        let f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&staged.tmp)?;
        let mut buffered = std::io::BufWriter::with_capacity(1 << 16, f);
        write(&mut buffered)?;
        buffered.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()?;
        Ok(staged)
    }

    /// Put the file in `path`'s place, and make that durable (fsync of the directory).
    ///
    /// # Errors
    /// The rename or the fsync failed.
    pub fn commit(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.tmp, &self.path)?;
        self.committed = true;
        std::fs::File::open(self.path.parent().unwrap_or(Path::new(".")))?.sync_all()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A regular file being written beside `dest`, to take its place once whole (module doc). The
/// file beside is removed if it never does.
#[derive(Debug)]
pub struct Replacement {
    dest: PathBuf,
    beside: PathBuf,
    /// The replaced file's owner, group and mode.
    old: Option<(u32, u32, u32)>,
    done: AtomicBool,
}

impl Replacement {
    /// Start replacing `dest`: `.NAME.restoring` in its directory, made anew (one a restore
    /// that died left is removed first; made with `O_EXCL`, so nothing put there meanwhile, a
    /// symlink least of all, is followed), with an existing destination's owner and mode, else
    /// `0600`.
    ///
    /// # Errors
    /// The file beside cannot be made, or given the old file's owner (not running as root).
    pub fn begin(dest: &Path) -> std::io::Result<(Self, File)> {
        let replacement = Self::prepare(dest)?;
        let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&replacement.beside)?;
        replacement.take_over(&file)?;
        Ok((replacement, file))
    }

    /// Where a restore into `dest` writes before it is whole (symlinks followed), whether or not
    /// one runs: what a restore that died leaves, for the node's start to remove.
    pub fn beside_of(dest: &Path) -> Option<PathBuf> {
        let dest = std::fs::canonicalize(dest).unwrap_or_else(|_| dest.to_path_buf());
        let name = dest.file_name()?.to_string_lossy().into_owned();
        Some(dest.parent()?.join(format!(".{name}.restoring")))
    }

    /// Where the new file goes, for a caller that makes it itself (a qcow2 image): nothing is
    /// there yet (a file left by a restore that died is removed). Then [`Self::take_over`].
    ///
    /// # Errors
    /// The destination cannot be resolved, or the old file beside cannot be removed.
    pub fn prepare(dest: &Path) -> std::io::Result<Self> {
        let replacement = Self::resolve(dest)?;
        match std::fs::remove_file(&replacement.beside) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(replacement)
    }

    /// The destination (symlinks followed), the file beside it, the old file's owner and mode.
    fn resolve(dest: &Path) -> std::io::Result<Self> {
        let old = std::fs::metadata(dest).ok();
        let dest = match old {
            Some(_) => std::fs::canonicalize(dest)?,
            None => dest.to_path_buf(),
        };
        let beside = Self::beside_of(&dest)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"))?;
        let old = old.map(|m| (m.uid(), m.gid(), m.mode() & 0o7777));
        Ok(Self { dest, beside, old, done: AtomicBool::new(false) })
    }

    /// Go on with the file a paused restore left beside `dest` (`jobs/handover.rs`): it must be
    /// there, a regular file, not a symlink.
    ///
    /// # Errors
    /// The destination cannot be resolved, or the file beside is missing or not a regular file.
    pub fn resume(dest: &Path) -> std::io::Result<Self> {
        let replacement = Self::resolve(dest)?;
        if !std::fs::symlink_metadata(&replacement.beside)?.file_type().is_file() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a regular file"));
        }
        Ok(replacement)
    }

    /// Leave the file beside in place when this is dropped: a paused restore goes on with it at
    /// the next start.
    pub fn keep(&self) {
        self.done.store(true, Ordering::SeqCst);
    }

    /// Give the new file the replaced one's owner and mode (none replaced: it stays as made).
    ///
    /// # Errors
    /// `chown` or `chmod` failed (another owner needs root).
    pub fn take_over(&self, file: &File) -> std::io::Result<()> {
        let Some((uid, gid, mode)) = self.old else { return Ok(()) };
        let new = file.metadata()?;
        if (new.uid(), new.gid()) != (uid, gid) {
            std::os::unix::fs::fchown(file, Some(uid), Some(gid))?;
        }
        file.set_permissions(std::fs::Permissions::from_mode(mode))
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.beside
    }

    /// Put `file` (the one [`Self::begin`] gave) in the destination's place, durably.
    ///
    /// # Errors
    /// A sync or the rename failed: the destination is then as it was.
    pub fn commit(&self, file: &File) -> std::io::Result<()> {
        file.sync_all()?;
        std::fs::rename(&self.beside, &self.dest)?;
        self.done.store(true, Ordering::SeqCst);
        File::open(self.dest.parent().unwrap_or(Path::new(".")))?.sync_all()
    }
}

impl Drop for Replacement {
    fn drop(&mut self) {
        if !self.done.load(Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.beside);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

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
        assert_eq!(mode(&record), 0o600, "a record describes a disk: its owner's alone");
        // A crash left the file being written, readable by all: the next write makes it anew.
        let stale = shared.join("a/b/.record.json.tmp");
        std::fs::write(&stale, b"half").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomically(&record, b"{\"v\":2}").unwrap();
        assert_eq!((std::fs::read(&record).unwrap(), mode(&record)), (b"{\"v\":2}".to_vec(), 0o600));
        assert!(!stale.exists());
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

    #[test]
    fn a_replacement_takes_the_files_place_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.raw");
        std::fs::write(&disk, b"old disk").unwrap();
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.path().join("vm-disk");
        std::os::unix::fs::symlink(&disk, &link).unwrap();

        // Abandoned (a failed or cancelled restore): the disk as it was, nothing left beside.
        let (r, f) = Replacement::begin(&link).unwrap();
        f.write_all_at(b"half", 0).unwrap();
        let beside = r.path().to_path_buf();
        assert_eq!(beside, dir.path().join(".disk.raw.restoring"), "beside the file the link names");
        drop(r);
        assert_eq!(std::fs::read(&disk).unwrap(), b"old disk");
        assert!(!beside.exists());

        // Committed: the new bytes under the old name, mode and link kept.
        let (r, f) = Replacement::begin(&link).unwrap();
        assert_eq!(mode(r.path()), 0o640, "the old file's mode from the start");
        f.write_all_at(b"new disk", 0).unwrap();
        r.commit(&f).unwrap();
        drop(r);
        assert_eq!(std::fs::read(&disk).unwrap(), b"new disk");
        assert_eq!(mode(&disk), 0o640);
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert!(!beside.exists());

        // A new destination is its owner's alone.
        let fresh = dir.path().join("new.raw");
        let (r, f) = Replacement::begin(&fresh).unwrap();
        r.commit(&f).unwrap();
        assert_eq!(mode(&fresh), 0o600);
    }

    #[test]
    fn a_paused_replacement_is_kept_and_goes_on_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.raw");
        std::fs::write(&disk, b"old disk").unwrap();
        assert!(Replacement::resume(&disk).is_err(), "nothing was paused");

        // Paused: kept beside, the disk as it was.
        let (r, f) = Replacement::begin(&disk).unwrap();
        f.write_all_at(b"new ", 0).unwrap();
        r.keep();
        let beside = r.path().to_path_buf();
        drop((r, f));
        assert!(beside.exists());
        assert_eq!(std::fs::read(&disk).unwrap(), b"old disk");

        // The next start writes on and puts it in place.
        let r = Replacement::resume(&disk).unwrap();
        let f = OpenOptions::new().write(true).open(r.path()).unwrap();
        f.write_all_at(b"disk", 4).unwrap();
        r.commit(&f).unwrap();
        assert_eq!(std::fs::read(&disk).unwrap(), b"new disk");
        assert!(!beside.exists());

        // Something else beside (a symlink) is not written through.
        std::os::unix::fs::symlink(&disk, &beside).unwrap();
        assert!(Replacement::resume(&disk).is_err());
    }
}
