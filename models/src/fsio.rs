//! Opening user-supplied paths without hanging or reading the wrong kind of thing.
//!
//! A path the user names (a model, a dataset, an adapter) may be a named pipe, a character
//! device or a socket: `open(2)` on a FIFO blocks until a writer appears, and `read` on
//! `/dev/zero` never ends. Every file Attune reads on a user's behalf is opened here: with
//! `O_NONBLOCK` (so opening a FIFO returns at once), then checked with `fstat` on the open
//! descriptor (so the check and the read see the same file), and refused unless it is a regular
//! file. A folder where a file is expected, or a file where a folder is expected, is refused
//! with a message that says which.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// What kind of file system object `meta` describes, in words.
pub fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let ft = meta.file_type();
    if ft.is_file() {
        return "a regular file";
    }
    if ft.is_dir() {
        return "a folder";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a named pipe (FIFO)";
        }
        if ft.is_socket() {
            return "a socket";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
    }
    "not a regular file"
}

fn not_regular(path: &Path, kind: &str) -> Error {
    Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is {kind}, not a regular file"),
        ),
    )
}

/// Opens `path` for reading if (and only if) it is a regular file. Never blocks on a FIFO.
pub fn open_regular(path: &Path) -> Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, kind_of(&meta)));
    }
    #[cfg(unix)]
    {
        // Back to blocking reads (O_NONBLOCK has no effect on regular files, but leave the
        // descriptor as any other File).
        use std::os::unix::io::AsRawFd;
        let fd = file.as_raw_fd();
        // SAFETY: fcntl on a descriptor this function owns; no memory is passed.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
    }
    Ok(file)
}

/// Reads the whole of `path`, a regular file.
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let mut file = open_regular(path)?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.read_to_end(&mut buf).map_err(|e| Error::io(path, e))?;
    Ok(buf)
}

/// Reads `path`, a regular UTF-8 text file.
pub fn read_regular_string(path: &Path) -> Result<String> {
    let bytes = read_regular(path)?;
    String::from_utf8(bytes).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "not UTF-8 text (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                ),
            ),
        )
    })
}

/// Whether `path` is a regular file (following symlinks); a FIFO, socket or device is not.
pub fn is_regular_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// Checks that `path` is a folder; the error says what it is instead.
pub fn require_dir(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        Ok(())
    } else {
        Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("it is {}, not a folder", kind_of(&meta)),
            ),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo {}", path.display());
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.jsonl");
        mkfifo(&fifo);
        let start = std::time::Instant::now();
        let err = read_regular(&fifo).expect_err("a FIFO is not a regular file");
        assert!(err.to_string().contains("named pipe (FIFO)"), "{err}");
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
        assert!(!is_regular_file(&fifo));
        let err = require_dir(&fifo).expect_err("not a folder");
        assert!(err.to_string().contains("not a folder"), "{err}");
    }

    #[test]
    fn folders_and_devices_are_refused_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_regular(dir.path()).expect_err("a folder");
        assert!(
            err.to_string().contains("a folder, not a regular file"),
            "{err}"
        );
        #[cfg(unix)]
        {
            let err = read_regular(Path::new("/dev/zero")).expect_err("a device");
            assert!(err.to_string().contains("character device"), "{err}");
        }
        let f = dir.path().join("a.txt");
        std::fs::write(&f, "hello").unwrap();
        assert_eq!(read_regular_string(&f).unwrap(), "hello");
        require_dir(dir.path()).unwrap();
        assert!(require_dir(&f).is_err());
    }
}
