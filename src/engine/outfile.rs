//! Where an output file goes. Outputs are written beside their destination and renamed into
//! place (a failure leaves nothing, a reader never sees half a file), which would replace a
//! symlink, a device or a pipe by a plain file: so a symlink is followed to the file it names,
//! and anything else that is not a plain file is refused, as is a destination that is one of the
//! files being read (renaming over a model that is still being read loses it).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The path to write `dest` through: `dest` itself, or the file a symlink at `dest` names.
/// A folder, a device, a pipe or a socket there is an error naming it.
pub fn destination(dest: &Path) -> Result<PathBuf> {
    let target = match std::fs::symlink_metadata(dest) {
        Ok(m) if m.file_type().is_symlink() => match std::fs::canonicalize(dest) {
            Ok(t) => t,
            // A link to a file that does not exist yet: written where it points, as
            // `File::create` would, when that folder exists.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let to =
                    std::fs::read_link(dest).with_context(|| format!("cannot read the link {}", dest.display()))?;
                let to = dest.parent().map_or(to.clone(), |p| p.join(&to));
                match to.parent().map(std::fs::canonicalize) {
                    Some(Ok(folder)) => folder.join(to.file_name().unwrap_or_default()),
                    _ => bail!(
                        "cannot write {}: it links to {}, whose folder does not exist",
                        dest.display(),
                        to.display()
                    ),
                }
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot follow the link {}", dest.display()))),
        },
        _ => dest.to_path_buf(),
    };
    match std::fs::metadata(&target) {
        Ok(m) if m.is_dir() => bail!("cannot write {}: it is a folder", dest.display()),
        Ok(m) if !m.is_file() => {
            bail!("cannot write {}: it is not a plain file (a device, pipe or socket)", dest.display())
        }
        Ok(m) if m.permissions().readonly() => bail!("cannot write {}: the file is read-only", dest.display()),
        _ => Ok(target),
    }
}

/// `path` with its folder's links resolved, for a file that may not exist yet.
fn resolved(path: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(path).ok().or_else(|| {
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Some(std::fs::canonicalize(folder).ok()?.join(path.file_name()?))
    })
}

/// Refuses `dest` when it is the file `input` or inside the folder `input` (compared after
/// following links, whether or not `dest` exists yet): the output would replace what is being
/// read, or land among the files a folder's loader reads.
pub fn refuse_overwriting_input(dest: &Path, input: &Path) -> Result<()> {
    let (Some(out), Ok(src)) = (resolved(&destination(dest)?), std::fs::canonicalize(input)) else {
        return Ok(());
    };
    if out == src || (src.is_dir() && out.starts_with(&src)) {
        bail!(
            "the output {} would overwrite the input {} or land inside it: write it somewhere else",
            dest.display(),
            input.display()
        );
    }
    Ok(())
}

/// A temporary name beside `dest` for writing it before the rename.
pub fn temporary(dest: &Path) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = dest.file_name().with_context(|| format!("{} has no file name", dest.display()))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(dest.with_file_name(format!(".{}.{}-{n}.tmp", name.to_string_lossy(), std::process::id())))
}

/// Creates a new file at a temporary name beside `dest` (resolved by [`destination`]) with
/// `options` (which may restrict its permissions): the temporary path and the file. Errors name
/// the folder that does not exist or cannot be written.
pub fn create_beside(dest: &Path, mut options: std::fs::OpenOptions) -> Result<(PathBuf, std::fs::File)> {
    let tmp = temporary(dest)?;
    let file = options.write(true).create_new(true).open(&tmp).map_err(|e| {
        let folder = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow::anyhow!("cannot write {}: the folder {} does not exist", dest.display(), folder.display())
            }
            _ => anyhow::Error::new(e).context(format!(
                "cannot write {} (in the folder {})",
                dest.display(),
                folder.display()
            )),
        }
    })?;
    Ok((tmp, file))
}

/// Checks before any compute that `dest` can be written: a plain file (or a new name) in a
/// folder that exists and takes new files. Nothing is left behind.
pub fn check_writable(dest: &Path) -> Result<()> {
    let (tmp, _) = create_beside(&destination(dest)?, std::fs::OpenOptions::new())?;
    let _ = std::fs::remove_file(tmp);
    Ok(())
}

/// Writes `dest` through `write` (given a file at a temporary name beside it), then syncs and
/// renames it into place; on any error the temporary file is removed and `dest` is untouched.
pub fn write_replacing(dest: &Path, write: impl FnOnce(&mut std::fs::File) -> Result<()>) -> Result<()> {
    let dest = destination(dest)?;
    let (tmp, mut file) = create_beside(&dest, std::fs::OpenOptions::new())?;
    // Removes the temporary file unless it was renamed into place, also when `write` panics.
    struct Pending(Option<PathBuf>);
    impl Drop for Pending {
        fn drop(&mut self) {
            if let Some(p) = self.0.take() {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let mut pending = Pending(Some(tmp.clone()));
    write(&mut file)?;
    commit(&file, &tmp, &dest)?;
    pending.0 = None;
    Ok(())
}

/// Puts the written temporary `file` at `tmp` in place of `dest`: a file it replaces keeps its
/// permissions (one the user made private stays private), the data reaches the disk first.
pub fn commit(file: &std::fs::File, tmp: &Path, dest: &Path) -> Result<()> {
    if let Ok(old) = std::fs::metadata(dest) {
        file.set_permissions(old.permissions()).with_context(|| format!("writing {}", dest.display()))?;
    }
    file.sync_all().with_context(|| format!("writing {}", dest.display()))?;
    std::fs::rename(tmp, dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_followed_and_special_files_and_inputs_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.bin");
        std::fs::write(&real, b"old").unwrap();
        let link = dir.path().join("link.bin");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write_replacing(&link, |f| Ok(std::io::Write::write_all(f, b"new")?)).unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays a link");
        assert_eq!(std::fs::read(&real).unwrap(), b"new");

        let e = destination(Path::new("/dev/null")).unwrap_err().to_string();
        assert!(e.contains("not a plain file"), "{e}");
        let e = destination(dir.path()).unwrap_err().to_string();
        assert!(e.contains("folder"), "{e}");
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("missing/x"), &dangling).unwrap();
        assert!(destination(&dangling).is_err(), "a link into a folder that does not exist");
        // A relative link to a file not written yet: written where it points.
        let ahead = dir.path().join("ahead.bin");
        std::os::unix::fs::symlink("later.bin", &ahead).unwrap();
        write_replacing(&ahead, |f| Ok(std::io::Write::write_all(f, b"later")?)).unwrap();
        assert_eq!(std::fs::read(dir.path().join("later.bin")).unwrap(), b"later");
        std::fs::remove_file(dir.path().join("later.bin")).unwrap();
        std::fs::remove_file(&ahead).unwrap();
        // A replaced file keeps its permissions; a read-only one is refused.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
        write_replacing(&real, |f| Ok(std::io::Write::write_all(f, b"newer")?)).unwrap();
        assert_eq!(std::fs::metadata(&real).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(destination(&real).unwrap_err().to_string().contains("read-only"));
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&real, b"new").unwrap();

        // A failed write leaves the destination as it was and no temporary file.
        let e = write_replacing(&real, |_| bail!("boom")).unwrap_err().to_string();
        assert!(e.contains("boom"));
        assert_eq!(std::fs::read(&real).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3, "real, link, dangling");

        assert!(refuse_overwriting_input(&real, dir.path()).is_err(), "inside the input folder");
        assert!(refuse_overwriting_input(&dir.path().join("new.gguf"), dir.path()).is_err(), "new, inside it");
        assert!(refuse_overwriting_input(&link, &real).is_err(), "a link to the input");
        assert!(refuse_overwriting_input(&dir.path().join("new.gguf"), &real).is_ok());
    }
}
