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
    let link = std::fs::symlink_metadata(dest);
    let target = match &link {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(dest)
            .with_context(|| format!("cannot write {}: it is a symlink to nothing", dest.display()))?,
        _ => dest.to_path_buf(),
    };
    match std::fs::metadata(&target) {
        Ok(m) if m.is_dir() => bail!("cannot write {}: it is a folder", dest.display()),
        Ok(m) if !m.is_file() => {
            bail!("cannot write {}: it is not a plain file (a device, pipe or socket)", dest.display())
        }
        _ => Ok(target),
    }
}

/// Refuses `dest` when it is the file `input` or inside the folder `input` (compared after
/// following links): the output would replace what is being read.
pub fn refuse_overwriting_input(dest: &Path, input: &Path) -> Result<()> {
    let (Ok(out), Ok(src)) = (std::fs::canonicalize(dest), std::fs::canonicalize(input)) else {
        // A destination that does not exist yet cannot be an input.
        return Ok(());
    };
    if out == src || (src.is_dir() && out.starts_with(&src)) {
        bail!("the output {} would overwrite the input {}: write it somewhere else", dest.display(), input.display());
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

/// Writes `dest` through `write` (given a file at a temporary name beside it), then syncs and
/// renames it into place; on any error the temporary file is removed and `dest` is untouched.
pub fn write_replacing(dest: &Path, write: impl FnOnce(&mut std::fs::File) -> Result<()>) -> Result<()> {
    let dest = destination(dest)?;
    let tmp = temporary(&dest)?;
    let result = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| {
            let folder = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            match e.kind() {
                std::io::ErrorKind::NotFound => {
                    anyhow::anyhow!("cannot write {}: the folder {} does not exist", dest.display(), folder.display())
                }
                _ => anyhow::Error::new(e).context(format!("cannot write {}", dest.display())),
            }
        })?;
        write(&mut file)?;
        file.sync_all().with_context(|| format!("writing {}", dest.display()))?;
        std::fs::rename(&tmp, &dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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
        assert!(destination(&dangling).is_err());

        // A failed write leaves the destination as it was and no temporary file.
        let e = write_replacing(&real, |_| bail!("boom")).unwrap_err().to_string();
        assert!(e.contains("boom"));
        assert_eq!(std::fs::read(&real).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3, "real, link, dangling");

        assert!(refuse_overwriting_input(&real, dir.path()).is_err(), "inside the input folder");
        assert!(refuse_overwriting_input(&link, &real).is_err(), "a link to the input");
        assert!(refuse_overwriting_input(&dir.path().join("new.gguf"), &real).is_ok());
    }
}
