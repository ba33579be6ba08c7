//! Files and folders only their owner may read: the data folder, the database, generated
//! images and the initial admin password hold other people's prompts, pictures and secrets,
//! so they are created 0700 / 0600 rather than left to the umask (usually world-readable).

use std::fs::{DirBuilder, OpenOptions};
use std::io;
use std::path::Path;

/// Creates `path` and any missing parents, each readable by the owner only. Folders that
/// already exist keep their mode: the owner may have chosen it.
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    let mut builder = DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(path)
}

/// Open options whose newly created files are readable and writable by the owner only (the
/// mode is set by the `open` call itself, so no content is ever readable by others). Add
/// `create`, `write`... as needed; a file that already exists keeps its mode.
pub fn open_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &std::path::Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn folders_and_files_are_the_owners_only() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        super::create_dir_all(&nested).unwrap();
        assert_eq!((mode(&dir.path().join("a")), mode(&nested)), (0o700, 0o700));
        let file = nested.join("f");
        super::open_options().write(true).create_new(true).open(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
    }
}
