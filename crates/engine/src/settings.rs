//! App preferences kept in the library (`settings` table): plain key / value strings
//! that the desktop app reads at start and writes when the user changes them.

use std::collections::BTreeMap;

use crate::error::EngineError;
use crate::Engine;

/// Longest key, in characters.
pub const MAX_SETTING_KEY_CHARS: usize = 64;
/// Largest value, in bytes.
pub const MAX_SETTING_VALUE_BYTES: usize = 64 * 1024;

impl Engine {
    /// Every stored setting.
    pub fn settings(&self) -> Result<BTreeMap<String, String>, EngineError> {
        Ok(self.store.settings()?.into_iter().collect())
    }

    /// Stores one setting (replacing its value). The key is 1 to 64 characters without
    /// control characters; the value at most 64 KiB.
    pub fn set_setting(&self, key: &str, value: &str) -> Result<(), EngineError> {
        let chars = key.chars().count();
        if chars == 0 || chars > MAX_SETTING_KEY_CHARS {
            return Err(EngineError::InvalidInput(format!(
                "setting key '{key}': must be 1 to {MAX_SETTING_KEY_CHARS} characters (got {chars})"
            )));
        }
        if key.chars().any(char::is_control) || key.trim() != key {
            return Err(EngineError::InvalidInput(format!(
                "setting key {key:?}: no control characters or surrounding spaces"
            )));
        }
        if value.len() > MAX_SETTING_VALUE_BYTES {
            return Err(EngineError::InvalidInput(format!(
                "setting '{key}': the value is {} bytes, more than the {MAX_SETTING_VALUE_BYTES} \
                 allowed",
                value.len()
            )));
        }
        self.store.set_setting(key, value)
    }
}

#[cfg(test)]
mod tests {
    use crate::Engine;

    #[test]
    fn settings_are_stored_replaced_and_kept_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        {
            let e = Engine::open(&data).expect("open");
            assert!(e.settings().expect("empty").is_empty());
            e.set_setting("theme", "dark").expect("set");
            e.set_setting("theme", "light").expect("replace");
            e.set_setting("playground.params", "{\"temperature\":0}")
                .expect("set json");
        }
        let e = Engine::open(&data).expect("reopen");
        let s = e.settings().expect("settings");
        assert_eq!(s.len(), 2);
        assert_eq!(s.get("theme").map(String::as_str), Some("light"));
    }

    #[test]
    fn settings_refuse_bad_keys_and_huge_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = Engine::open(&dir.path().join("data")).expect("open");
        for key in ["", " padded", "new\nline"] {
            let err = e.set_setting(key, "v").expect_err(key);
            assert_eq!(err.code(), "invalid_input", "{key:?}");
        }
        let long = "k".repeat(65);
        assert!(e.set_setting(&long, "v").is_err());
        e.set_setting(&"k".repeat(64), "v")
            .expect("64 chars is fine");
        let big = "x".repeat(64 * 1024 + 1);
        let err = e.set_setting("big", &big).expect_err("too big");
        assert!(err.to_string().contains("big"), "{err}");
        e.set_setting("big", &big[1..]).expect("64 KiB is fine");
        assert_eq!(e.settings().expect("settings").len(), 2);
    }
}
