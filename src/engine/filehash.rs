//! File hashes the PNG text records (A1111's `Model hash` and `Lora hashes`): the sha256 of a
//! whole file, or of a safetensors file's tensor bytes (after its header). Hashing a 24 GB
//! checkpoint takes about a minute, so every result is kept by (path, span, size, mtime) in
//! memory and, once [`set_cache_file`] names a file (the data folder's), on disk across runs,
//! the way A1111 keeps its `cache.json`. A file that changed (size or mtime) is hashed again.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Which bytes of a file are hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// Every byte (A1111's model hash).
    Whole,
    /// The bytes after a safetensors header (A1111's LoRA hash when the file has no
    /// `sshs_model_hash`), so that editing the metadata keeps the hash.
    SafetensorsTensors,
}

impl Span {
    fn tag(self) -> &'static str {
        match self {
            Span::Whole => "whole",
            Span::SafetensorsTensors => "tensors",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

#[derive(Default)]
struct Cache {
    file: Option<PathBuf>,
    entries: BTreeMap<String, Entry>,
}

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

fn with_cache<R>(f: impl FnOnce(&mut Cache) -> R) -> R {
    let mut guard = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(Cache::default))
}

/// Keeps hashes in `file` from now on (and reads what it holds). An unreadable or corrupt
/// cache file is ignored: it only costs hashing again.
pub fn set_cache_file(file: PathBuf) {
    let entries = std::fs::read(&file)
        .ok()
        .and_then(|b| serde_json::from_slice::<BTreeMap<String, Entry>>(&b).ok())
        .unwrap_or_default();
    with_cache(|c| {
        c.entries.extend(entries);
        c.file = Some(file);
    });
}

/// The file's size and modification time, what a cached hash is checked against.
fn stamp(path: &Path) -> Result<(u64, u128)> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
    Ok((meta.len(), mtime.as_nanos()))
}

/// The sha256 (64 hex digits) of `span` of the file at `path`, from the cache when the file is
/// unchanged since it was hashed.
pub fn sha256(path: &Path, span: Span) -> Result<String> {
    let abs = std::fs::canonicalize(path).with_context(|| format!("cannot open {}", path.display()))?;
    let key = format!("{}:{}", span.tag(), abs.display());
    let (size, mtime_ns) = stamp(&abs)?;
    let cached = with_cache(|c| c.entries.get(&key).filter(|e| e.size == size && e.mtime_ns == mtime_ns).cloned());
    if let Some(e) = cached {
        return Ok(e.sha256);
    }
    // Hashed without the lock held: a long hash never blocks other lookups.
    let sha256 = hash_file(&abs, span)?;
    let entry = Entry { size, mtime_ns, sha256: sha256.clone() };
    let to_save = with_cache(|c| {
        c.entries.insert(key, entry);
        // Files that are gone (a deleted LoRA, an upload that was refused) leave the cache.
        c.entries.retain(|k, _| k.split_once(':').is_some_and(|(_, p)| Path::new(p).exists()));
        c.file.clone().map(|f| (f, serde_json::to_vec_pretty(&c.entries).expect("hash entries serialize")))
    });
    if let Some((file, bytes)) = to_save {
        // Written beside under a name of its own and renamed: a reader never sees half a file,
        // and two saves at once never write into one temporary file.
        static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = file.with_extension(format!("json.{}-{n}.tmp", std::process::id()));
        if let Err(e) = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &file)) {
            log::warn!("could not save file hashes to {}: {e}", file.display());
        }
    }
    Ok(sha256)
}

fn hash_file(path: &Path, span: Span) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    if span == Span::SafetensorsTensors {
        let mut len = [0u8; 8];
        f.read_exact(&mut len).with_context(|| format!("{} is not a safetensors file", path.display()))?;
        let header = u64::from_le_bytes(len);
        std::io::copy(&mut f.by_ref().take(header), &mut std::io::sink())?;
    }
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A1111's `Model hash`: the first 10 hex digits of the whole file's sha256.
pub fn model_hash(path: &Path) -> Result<String> {
    Ok(sha256(path, Span::Whole)?[..10].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_cached_until_the_file_changes_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("hashes.json");
        set_cache_file(cache.clone());
        let f = dir.path().join("m.safetensors");
        // An 8-byte header length of 2, a 2-byte header, then the "tensor" bytes.
        let mut bytes = 2u64.to_le_bytes().to_vec();
        bytes.extend(b"{}abc");
        std::fs::write(&f, &bytes).unwrap();
        let whole = sha256(&f, Span::Whole).unwrap();
        assert_eq!(whole, format!("{:x}", Sha256::digest(&bytes)));
        assert_eq!(sha256(&f, Span::SafetensorsTensors).unwrap(), format!("{:x}", Sha256::digest(b"abc")));
        assert_eq!(model_hash(&f).unwrap(), whole[..10]);
        let saved = std::fs::read_to_string(&cache).unwrap();
        assert!(saved.contains(&whole), "{saved}");

        // A stale entry (same size, other mtime) is not believed.
        std::thread::sleep(std::time::Duration::from_millis(20));
        bytes[10] = b'x';
        std::fs::write(&f, &bytes).unwrap();
        assert_eq!(sha256(&f, Span::Whole).unwrap(), format!("{:x}", Sha256::digest(&bytes)));
    }
}
