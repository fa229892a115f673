//! Which paths the window may make the shell read or write.
//!
//! The webview is the least trusted part of the app: it renders model output and imported
//! text, and a script injected there could call any command. So a command that reads or writes
//! a path the user named only accepts a path the user *granted* through the Rust side:
//!
//! - a file or folder chosen in the system file chooser (`pick_path`, run from Rust);
//! - a file or folder dropped onto the window (the shell sees the drop event itself);
//! - a path typed into the window, once the user allowed it in a native dialog that the shell
//!   opens (`confirm_path`), which shows the exact path;
//! - anything under the data directory (the library's own folders);
//! - the paths in `ATTUNE_ALLOW_PATHS` (colon-separated; for scripts and the end-to-end test,
//!   which cannot click a native dialog; only whoever starts the process can set it).
//!
//! A granted folder grants what is inside it. Paths are compared after resolving symbolic
//! links, so a link inside a granted folder cannot point the shell elsewhere. Writes never
//! replace an existing file or folder: the target must not exist, and its parent must be
//! granted.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use attune_protocol::{ErrorCode, IpcError};

// A path the user has not granted is refused with `ErrorCode::PathNotAllowed`; the UI then asks
// the user (`confirm_path`) and tries again.

/// The granted paths.
pub struct PathScope {
    data_dir: PathBuf,
    grants: Mutex<Vec<PathBuf>>,
}

fn canonical(p: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(p).ok()
}

impl PathScope {
    /// The scope of a shell on `data_dir`, with the paths of `ATTUNE_ALLOW_PATHS` granted.
    pub fn new(data_dir: &Path) -> PathScope {
        let scope = PathScope {
            data_dir: canonical(data_dir).unwrap_or_else(|| data_dir.to_path_buf()),
            grants: Mutex::new(Vec::new()),
        };
        if let Some(list) = std::env::var_os("ATTUNE_ALLOW_PATHS") {
            for p in std::env::split_paths(&list) {
                if !p.as_os_str().is_empty() {
                    scope.grant(&p);
                }
            }
        }
        scope
    }

    /// Grants `path` (and, for a folder, what it holds). A path that does not exist yet is
    /// granted as its resolved parent plus its name (a save target).
    pub fn grant(&self, path: &Path) {
        let resolved = canonical(path).or_else(|| {
            let parent = canonical(path.parent()?)?;
            Some(parent.join(path.file_name()?))
        });
        if let Some(p) = resolved {
            tracing::info!(path = %p.display(), "path granted by the user");
            let mut g = self.grants.lock().unwrap_or_else(|e| e.into_inner());
            if !g.contains(&p) {
                g.push(p);
            }
        }
    }

    fn allowed(&self, resolved: &Path) -> bool {
        if resolved.starts_with(&self.data_dir) {
            return true;
        }
        let g = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        g.iter().any(|grant| resolved.starts_with(grant))
    }

    fn refuse(path: &Path, what: &str) -> IpcError {
        tracing::warn!(path = %path.display(), what, "path refused: not granted by the user");
        IpcError {
            code: ErrorCode::PathNotAllowed,
            message: format!(
                "{} was not chosen in this window: choose it with the file chooser, drop it \
                 onto the window, or allow it when Attune asks (to {what} it)",
                path.display()
            ),
        }
    }

    /// The resolved path if the window may read `path`.
    pub fn readable(&self, path: &Path) -> Result<PathBuf, IpcError> {
        let Some(resolved) = canonical(path) else {
            // Let the engine report a missing file in its own words, but only for a path
            // whose folder is granted (the error must not reveal what exists elsewhere).
            let parent_ok = path
                .parent()
                .and_then(canonical)
                .is_some_and(|p| self.allowed(&p));
            return if parent_ok {
                Ok(path.to_path_buf())
            } else {
                Err(Self::refuse(path, "read"))
            };
        };
        if self.allowed(&resolved) {
            Ok(resolved)
        } else {
            Err(Self::refuse(path, "read"))
        }
    }

    /// The resolved path if the window may create `path`: it does not exist, and its folder
    /// (or the path itself, granted as a save target) is granted.
    pub fn writable(&self, path: &Path) -> Result<PathBuf, IpcError> {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(IpcError {
                code: ErrorCode::AlreadyExists,
                message: format!(
                    "{} already exists; Attune never replaces a file or folder: choose another \
                     name or remove it first",
                    path.display()
                ),
            });
        }
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let Some(parent) = canonical(parent) else {
            return Err(Self::refuse(path, "write"));
        };
        let Some(name) = path.file_name() else {
            return Err(Self::refuse(path, "write"));
        };
        let resolved = parent.join(name);
        if self.allowed(&resolved) {
            Ok(resolved)
        } else {
            Err(Self::refuse(path, "write"))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_granted_paths_and_the_data_dir_are_readable() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir_all(data.join("models")).unwrap();
        std::fs::write(data.join("models/m.gguf"), "x").unwrap();
        let home = root.path().join("home");
        std::fs::create_dir_all(home.join("docs")).unwrap();
        std::fs::write(home.join("secret"), "key").unwrap();
        std::fs::write(home.join("docs/a.jsonl"), "{}").unwrap();
        std::fs::write(home.join("docs/b.jsonl"), "{}").unwrap();
        let scope = PathScope::new(&data);

        scope.readable(&data.join("models/m.gguf")).unwrap();
        let e = scope.readable(&home.join("secret")).unwrap_err();
        assert_eq!(e.code, ErrorCode::PathNotAllowed);
        assert_eq!(
            scope.readable(&home.join("docs/a.jsonl")).unwrap_err().code,
            ErrorCode::PathNotAllowed
        );
        // A missing file outside the scope does not say whether it exists.
        assert_eq!(
            scope.readable(&home.join("nope")).unwrap_err().code,
            ErrorCode::PathNotAllowed
        );

        scope.grant(&home.join("docs/a.jsonl"));
        scope.readable(&home.join("docs/a.jsonl")).unwrap();
        assert!(scope.readable(&home.join("docs/b.jsonl")).is_err());
        scope.grant(&home.join("docs"));
        scope.readable(&home.join("docs/b.jsonl")).unwrap();
        // `..` and links resolve before the check.
        assert!(scope.readable(&home.join("docs/../secret")).is_err());
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(home.join("secret"), home.join("docs/link")).unwrap();
            assert!(scope.readable(&home.join("docs/link")).is_err());
        }
    }

    #[test]
    fn writes_need_a_granted_folder_and_never_replace() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let out = root.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("old.jsonl"), "keep").unwrap();
        let scope = PathScope::new(&data);
        assert_eq!(
            scope.writable(&out.join("new.jsonl")).unwrap_err().code,
            ErrorCode::PathNotAllowed
        );
        scope.grant(&out);
        scope.writable(&out.join("new.jsonl")).unwrap();
        let e = scope.writable(&out.join("old.jsonl")).unwrap_err();
        assert_eq!(e.code, "already_exists");
        assert_eq!(
            std::fs::read_to_string(out.join("old.jsonl")).unwrap(),
            "keep"
        );
        // A single save target granted before it exists.
        let other = root.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        scope.grant(&other.join("pairs.jsonl"));
        scope.writable(&other.join("pairs.jsonl")).unwrap();
        assert!(scope.writable(&other.join("else.jsonl")).is_err());
    }
}
