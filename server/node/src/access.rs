//! Which local paths a request may name. A `file://` source, a directory to scan or a
//! catalog file is allowed only under a configured root (`--allow-dir`, and every
//! `--models-dir`). The path is resolved, symlinks included, before the check, so a
//! link inside a root cannot lead outside it. A refusal says nothing about the file:
//! not whether it exists, nor its size or digest.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// The directories local paths must resolve under.
#[derive(Debug, Clone, Default)]
pub struct LocalRoots {
    /// Resolved at start-up; a root that does not exist yet is kept as written.
    roots: Vec<PathBuf>,
}

impl LocalRoots {
    pub fn new(dirs: impl IntoIterator<Item = PathBuf>) -> LocalRoots {
        let mut roots: Vec<PathBuf> = dirs
            .into_iter()
            .map(|d| std::fs::canonicalize(&d).unwrap_or_else(|_| lexical(&d)))
            .collect();
        roots.sort();
        roots.dedup();
        LocalRoots { roots }
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// `path` (named by request field `field`) if it resolves under a root.
    /// Blocking: it resolves the path on the filesystem.
    pub fn check(&self, field: &str, path: &Path) -> Result<PathBuf> {
        let refused = || Error::PathNotAllowed {
            field: field.to_owned(),
        };
        if !path.is_absolute() {
            return Err(refused());
        }
        // A path that resolves is judged by where it leads. One that does not (it
        // does not exist yet, or cannot be read) only by how it is written: under a
        // root it fails later with "not found", which tells nothing of the outside.
        let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| lexical(path));
        if self.roots.iter().any(|r| resolved.starts_with(r)) {
            Ok(resolved)
        } else {
            Err(refused())
        }
    }

    /// Checks a source URL: `file://` URLs must resolve under a root; other schemes
    /// are not local and pass.
    pub fn check_url(&self, field: &str, raw: &str) -> Result<()> {
        let Ok(url) = url::Url::parse(raw) else {
            return Ok(());
        };
        if url.scheme() != "file" {
            return Ok(());
        }
        let path = url.to_file_path().map_err(|()| Error::PathNotAllowed {
            field: field.to_owned(),
        })?;
        self.check(field, &path).map(drop)
    }
}

/// `path` with `.` and `..` taken out by their spelling alone.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_that_resolve_under_a_root_pass() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("model.gguf"), b"x").unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let roots = LocalRoots::new([root.path().to_path_buf()]);

        assert!(roots.check("f", &root.path().join("model.gguf")).is_ok());
        // Not there yet, but under the root: its absence is the caller's to learn.
        assert!(roots.check("f", &root.path().join("later.gguf")).is_ok());
        for refused in [
            outside.path().join("secret"),
            outside.path().join("missing"),
            root.path()
                .join("../")
                .join(outside.path().file_name().unwrap())
                .join("secret"),
            PathBuf::from("/etc/passwd"),
            PathBuf::from("relative/model.gguf"),
        ] {
            let e = roots.check("spec.files[0].urls[0]", &refused).unwrap_err();
            assert!(
                matches!(e, Error::PathNotAllowed { .. }),
                "{refused:?}: {e}"
            );
            // The refusal reads the same whether the file exists or not.
            assert!(!e.to_string().contains("secret") && !e.to_string().contains("missing"));
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_inside_a_root_that_leads_outside_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("link"))
            .unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("dir")).unwrap();
        let roots = LocalRoots::new([root.path().to_path_buf()]);
        assert!(roots.check("f", &root.path().join("link")).is_err());
        assert!(roots.check("f", &root.path().join("dir/secret")).is_err());
    }

    #[test]
    fn urls_other_than_file_are_not_local() {
        let roots = LocalRoots::default();
        assert!(roots.check_url("u", "https://example.com/m.gguf").is_ok());
        assert!(roots.check_url("u", "file:///etc/passwd").is_err());
    }

    #[test]
    fn with_no_roots_nothing_local_is_allowed() {
        let roots = LocalRoots::default();
        assert!(roots.check("f", Path::new("/")).is_err());
    }
}
