//! Files that appear whole or not at all: written under a temporary name in the destination
//! folder, synced, then renamed. A cancel, a crash or a full disk leaves no half-written file
//! under the final name (at most a `.partial-*` file, removed on drop when the process lives).

use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A file being written; `commit` gives it its final name, dropping it removes it.
pub struct AtomicFile {
    tmp: PathBuf,
    dst: PathBuf,
    out: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Starts `dst` as `<dst>.partial-<pid>` in the same folder (so the rename is atomic).
    pub fn create(dst: &Path) -> Result<AtomicFile> {
        let mut name = dst.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".partial-{}", std::process::id()));
        let tmp = dst.with_file_name(name);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(AtomicFile {
            tmp,
            dst: dst.to_path_buf(),
            out: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// Where the data goes.
    pub fn writer(&mut self) -> Result<&mut BufWriter<File>> {
        let tmp = &self.tmp;
        self.out
            .as_mut()
            .ok_or_else(|| Error::io(tmp, std::io::Error::other("the file is closed")))
    }

    /// Bytes written so far.
    pub fn position(&mut self) -> Result<u64> {
        let tmp = self.tmp.clone();
        self.writer()?
            .stream_position()
            .map_err(|e| Error::io(&tmp, e))
    }

    /// Writes `bytes`; an error (a full disk) names the final file.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let dst = self.dst.clone();
        self.writer()?
            .write_all(bytes)
            .map_err(|e| Error::io(&dst, e))
    }

    /// Flushes, syncs and renames to the final name.
    pub fn commit(mut self) -> Result<()> {
        let out = self.out.take();
        let res = (|| -> std::io::Result<()> {
            if let Some(out) = out {
                let file = out.into_inner().map_err(|e| e.into_error())?;
                file.sync_all()?;
            }
            std::fs::rename(&self.tmp, &self.dst)
        })();
        res.map_err(|e| Error::io(&self.dst, e))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.tmp.exists() {
            self.out = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `dst` through a temporary file.
pub fn write_atomic(dst: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(dst)?;
    f.write_all(bytes)?;
    f.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_file_leaves_nothing_and_committed_file_appears_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dst = dir.path().join("model.gguf");
        {
            let mut f = AtomicFile::create(&dst).expect("create");
            f.write_all(b"half").expect("write");
            // dropped without commit: a cancel
        }
        assert!(!dst.exists());
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
        write_atomic(&dst, b"whole").expect("write");
        assert_eq!(std::fs::read(&dst).expect("read"), b"whole");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    }
}
