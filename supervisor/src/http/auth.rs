//! API keys for the TCP listener (`api_keys_file`).
//!
//! The file holds one key per line; blank lines and lines starting with `#`
//! are ignored. A key is at least [`MIN_KEY_LEN`] characters of visible
//! ASCII (it travels in an `Authorization: Bearer` header). The file must
//! not be readable by every user. Keys are re-read on SIGHUP, so a key is
//! rotated by editing the file and reloading.
//!
//! A presented key is compared with every configured key in full, without
//! stopping at the first differing byte or the first match, so the time an
//! answer takes does not tell how much of a guess was right. (It does tell
//! whether some key has the guessed length; keys are long enough that this
//! does not help.)

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Shortest accepted key: shorter ones are guessable.
pub const MIN_KEY_LEN: usize = 16;

/// The configured keys. `Debug` shows how many, never the keys.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKeys {
    /// Each key's bytes.
    keys: Vec<Box<[u8]>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

impl ApiKeys {
    /// Reads the keys file; the error says what to fix.
    pub fn load(path: &Path) -> Result<Self, String> {
        let metadata = std::fs::metadata(path)
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o004 != 0 {
            return Err(format!(
                "{} is readable by every user (mode {mode:04o}); chmod 0600 or 0640 it",
                path.display()
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        Self::parse(&text).map_err(|reason| format!("{}: {reason}", path.display()))
    }

    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let key = line.trim();
            if key.is_empty() || key.starts_with('#') {
                continue;
            }
            if !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "line {}: a key is visible ASCII without spaces",
                    number + 1
                ));
            }
            if key.len() < MIN_KEY_LEN {
                return Err(format!(
                    "line {}: a key must be at least {MIN_KEY_LEN} characters",
                    number + 1
                ));
            }
            keys.push(key.as_bytes().into());
        }
        if keys.is_empty() {
            return Err("no keys (one per line; `#` starts a comment)".into());
        }
        Ok(Self { keys })
    }

    /// True when no key is configured (no keys file).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// True when `presented` is one of the keys.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        self.keys
            .iter()
            .fold(false, |found, key| found | same_bytes(key, presented))
    }
}

/// Compares two byte strings of equal length in time that depends only on
/// the length.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the compiler from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// The key of an `Authorization: Bearer KEY` header value.
pub fn bearer(header: &[u8]) -> Option<&[u8]> {
    let rest = header.strip_prefix(b"Bearer ").or_else(|| {
        // The scheme is case-insensitive (RFC 9110 section 11.1).
        (header.len() > 7 && header[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &header[7..])
    })?;
    let key = rest.trim_ascii();
    (!key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_file_skips_comments_and_refuses_short_or_spaced_keys() {
        let keys = ApiKeys::parse("# ops team\n\n  key-0123456789abcdef  \nother-key-0123456789\n")
            .expect("two keys");
        assert!(keys.accepts(b"key-0123456789abcdef"));
        assert!(keys.accepts(b"other-key-0123456789"));
        assert!(!keys.accepts(b"key-0123456789abcdeX"));
        assert!(!keys.accepts(b"key-0123456789abcde"));
        assert!(!keys.accepts(b""));
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)");
        let short = ApiKeys::parse("tooshort\n").expect_err("short");
        assert!(short.contains("line 1") && short.contains("16"), "{short}");
        let spaced = ApiKeys::parse("# c\nkey with spaces 0123456789\n").expect_err("spaces");
        assert!(spaced.contains("line 2"), "{spaced}");
        assert!(ApiKeys::parse("# only a comment\n").is_err());
    }

    #[test]
    fn a_world_readable_keys_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        std::fs::write(&path, "key-0123456789abcdef\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = ApiKeys::load(&path).expect_err("world-readable");
        assert!(err.contains("0644") && err.contains("chmod"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(ApiKeys::load(&path)
            .expect("0640 is fine")
            .accepts(b"key-0123456789abcdef"));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_a_key() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearer"), None);
    }
}
