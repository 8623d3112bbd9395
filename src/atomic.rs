//! Atomic file writes: results are never left half-written if the process dies, and a failed
//! write leaves nothing behind (the temporary file is removed on every error path).

use anyhow::Context;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Removes the temporary file unless disarmed: every early return (a full disk, a failed sync,
/// a rename onto a directory) cleans up without each path having to remember it.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it over `path`.
/// Every error names `path` (the file the user asked for), with the cause after it.
pub fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "writing {}: creating its directory {}",
            path.display(),
            dir.display()
        )
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let mut guard = TempGuard(None);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        guard.0 = Some(tmp.clone());
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    result.with_context(|| format!("writing {}", path.display()))?;
    // renamed: the temporary name is gone, nothing to remove
    guard.0 = None;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp"))
            .collect()
    }

    #[test]
    fn writes_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write(&p, b"one").unwrap();
        write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn a_failed_write_names_the_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a non-empty directory: the temporary file is written, then the rename
        // over the directory fails, so only the cleanup can remove it.
        let target = dir.path().join("report.json");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("inside"), b"x").unwrap();
        let e = write(&target, b"data").unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("report.json"), "{msg}");
        assert_eq!(leftovers(dir.path()), Vec::<String>::new());
        // a parent that is a file: the directory cannot be made; the message names the target
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let e = write(&file.join("x.json"), b"data").unwrap_err();
        assert!(format!("{e:#}").contains("x.json"), "{e:#}");
        assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    }

    /// The filesystem refuses the temporary file itself (a name over 255 bytes): the error
    /// still names the file asked for, and nothing is left behind.
    #[test]
    fn a_refused_name_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let long = dir.path().join("x".repeat(300));
        let e = write(&long, b"data").unwrap_err();
        assert!(format!("{e:#}").starts_with("writing "), "{e:#}");
        assert!(leftovers(dir.path()).is_empty());
    }
}
