//! Where endpoint keys live: the OS keyring (Secret Service on Linux, Keychain on
//! macOS, Credential Manager on Windows, through the `keyring` crate), never the
//! library, logs or error messages. Where no keyring service runs (a bare Linux
//! session without gnome-keyring or KWallet), a key is kept in this process's memory
//! until it exits, and the caller is told so.
//!
//! A key can also come from the environment, `ATTUNE_KEY_<NAME>` (the endpoint's name
//! upper-cased, other characters as `_`), for scripts and CI.

use std::collections::HashMap;
use std::sync::Mutex;

use attune_protocol::KeyStorage;

/// The keyring service name of Attune's endpoint keys.
const SERVICE: &str = "attune-endpoint";

/// Keys of this process, by entry id, for where the keyring is missing; and why the
/// keyring last failed.
#[derive(Default)]
pub(crate) struct Keys {
    memory: Mutex<HashMap<String, String>>,
    keyring_error: Mutex<Option<String>>,
    /// Tests pretend there is no keyring service.
    no_keyring: bool,
}

/// The environment variable that may hold the key of endpoint entry `id`
/// ("<data dir>::<name>": the name part counts).
pub fn env_var(id: &str) -> String {
    let name = id.rsplit("::").next().unwrap_or(id);
    let mut v = String::from("ATTUNE_KEY_");
    v.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    v
}

impl Keys {
    /// A key store that never uses the OS keyring (tests, and `ATTUNE_NO_KEYRING=1`).
    pub fn memory_only() -> Keys {
        Keys {
            no_keyring: true,
            ..Keys::default()
        }
    }

    pub fn from_env() -> Keys {
        if std::env::var_os("ATTUNE_NO_KEYRING").is_some_and(|v| v == "1") {
            Keys::memory_only()
        } else {
            Keys::default()
        }
    }

    fn lock_memory(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note_failure(&self, e: &keyring::Error) {
        *self.keyring_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(match e {
            keyring::Error::NoStorageAccess(_) | keyring::Error::PlatformFailure(_) => {
                format!("the keyring service could not be reached: {e}")
            }
            other => other.to_string(),
        });
    }

    /// Why the keyring is not used, for messages.
    pub fn why_no_keyring(&self) -> String {
        if self.no_keyring {
            return "the keyring is switched off (ATTUNE_NO_KEYRING=1)".into();
        }
        self.keyring_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "the keyring service did not answer".into())
    }

    fn entry(&self, id: &str) -> Option<keyring::Entry> {
        if self.no_keyring {
            return None;
        }
        match keyring::Entry::new(SERVICE, id) {
            Ok(e) => Some(e),
            Err(e) => {
                self.note_failure(&e);
                None
            }
        }
    }

    /// Stores `key` for entry `id`: in the keyring when one answers, else in memory.
    pub fn set(&self, id: &str, key: &str) -> KeyStorage {
        if let Some(entry) = self.entry(id) {
            match entry.set_password(key) {
                Ok(()) => {
                    self.lock_memory().remove(id);
                    return KeyStorage::Keyring;
                }
                Err(e) => self.note_failure(&e),
            }
        }
        self.lock_memory().insert(id.to_string(), key.to_string());
        KeyStorage::Memory
    }

    /// The key of entry `id`: memory (this session's), then the keyring, then the
    /// environment.
    pub fn get(&self, id: &str) -> Option<String> {
        if let Some(k) = self.lock_memory().get(id) {
            return Some(k.clone());
        }
        if let Some(entry) = self.entry(id) {
            match entry.get_password() {
                Ok(k) => return Some(k),
                Err(keyring::Error::NoEntry) => {}
                Err(e) => self.note_failure(&e),
            }
        }
        std::env::var(env_var(id)).ok().filter(|k| !k.is_empty())
    }

    /// Where the key of entry `id` is now (for an endpoint that has one).
    pub fn storage(&self, id: &str) -> KeyStorage {
        if self.lock_memory().contains_key(id) {
            return KeyStorage::Memory;
        }
        if let Some(entry) = self.entry(id) {
            if entry.get_password().is_ok() {
                return KeyStorage::Keyring;
            }
        }
        if std::env::var(env_var(id)).is_ok_and(|k| !k.is_empty()) {
            return KeyStorage::Memory;
        }
        KeyStorage::Missing
    }

    /// Forgets the key of entry `id` everywhere it may be.
    pub fn delete(&self, id: &str) {
        self.lock_memory().remove(id);
        if let Some(entry) = self.entry(id) {
            match entry.delete_credential() {
                Ok(()) | Err(keyring::Error::NoEntry) => {}
                Err(e) => self.note_failure(&e),
            }
        }
    }
}
