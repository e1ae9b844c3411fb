//! The checkpoint keys: an Ed25519 signing key the writer holds, and a
//! verifying key kept elsewhere for auditors. Both are one-line text files
//! (`palisade-audit-signing-key-v1 <hex>`), so an operator can see what a
//! file is before using it.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

const SIGNING_TAG: &str = "palisade-audit-signing-key-v1";
const VERIFYING_TAG: &str = "palisade-audit-verifying-key-v1";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; move it away first (keygen never overwrites a key)")]
    Exists { path: PathBuf },
    #[error("{path} is not a {expected} file (expected one line `{expected} <64 hex digits>`)")]
    Malformed {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

/// The writer's key.
pub struct CheckpointSigner {
    key: SigningKey,
    key_id: String,
}

/// The auditor's key.
#[derive(Clone)]
pub struct CheckpointVerifier {
    key: VerifyingKey,
    key_id: String,
}

/// First 16 hex digits of SHA-256 of the verifying key's bytes; written in
/// every checkpoint so a verifier can tell "wrong key" from "forged".
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

impl CheckpointSigner {
    pub fn load(path: &Path) -> Result<CheckpointSigner, KeyError> {
        let bytes = read_tagged(path, SIGNING_TAG)?;
        let key = SigningKey::from_bytes(&bytes);
        let key_id = key_id(&key.verifying_key());
        Ok(CheckpointSigner { key, key_id })
    }

    pub fn from_seed(seed: [u8; 32]) -> CheckpointSigner {
        let key = SigningKey::from_bytes(&seed);
        let key_id = key_id(&key.verifying_key());
        CheckpointSigner { key, key_id }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn sign(&self, message: &[u8]) -> String {
        hex::encode(self.key.sign(message).to_bytes())
    }

    pub fn verifier(&self) -> CheckpointVerifier {
        CheckpointVerifier {
            key: self.key.verifying_key(),
            key_id: self.key_id.clone(),
        }
    }
}

impl CheckpointVerifier {
    pub fn load(path: &Path) -> Result<CheckpointVerifier, KeyError> {
        let bytes = read_tagged(path, VERIFYING_TAG)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::Malformed {
            path: path.to_path_buf(),
            expected: VERIFYING_TAG,
        })?;
        Ok(CheckpointVerifier {
            key_id: key_id(&key),
            key,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// True when `signature_hex` is this key's signature of `message`.
    pub fn verify(&self, message: &[u8], signature_hex: &str) -> bool {
        let Ok(raw) = hex::decode(signature_hex) else {
            return false;
        };
        let Ok(sig) = Signature::from_slice(&raw) else {
            return false;
        };
        self.key.verify(message, &sig).is_ok()
    }
}

fn read_tagged(path: &Path, tag: &'static str) -> Result<[u8; 32], KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let malformed = || KeyError::Malformed {
        path: path.to_path_buf(),
        expected: tag,
    };
    let hex_part = text.trim().strip_prefix(tag).ok_or_else(malformed)?.trim();
    let raw = hex::decode(hex_part).map_err(|_| malformed())?;
    raw.try_into().map_err(|_| malformed())
}

/// Fresh random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(buf)
}

/// Writes a new key pair: `signing` (mode 0600) and `verifying`. Refuses
/// to overwrite either. Returns the key id.
pub fn generate_key_pair(signing: &Path, verifying: &Path) -> Result<String, KeyError> {
    for p in [signing, verifying] {
        if p.exists() {
            return Err(KeyError::Exists {
                path: p.to_path_buf(),
            });
        }
    }
    let signer = CheckpointSigner::from_seed(random_bytes::<32>()?);
    let public = signer.key.verifying_key();
    write_new(
        signing,
        &format!("{SIGNING_TAG} {}\n", hex::encode(signer.key.to_bytes())),
        0o600,
    )?;
    write_new(
        verifying,
        &format!("{VERIFYING_TAG} {}\n", hex::encode(public.as_bytes())),
        0o644,
    )?;
    Ok(signer.key_id)
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let werr = |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(werr)?;
    f.write_all(text.as_bytes()).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_round_trip_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let (s, v) = (dir.path().join("a.key"), dir.path().join("a.pub"));
        let id = generate_key_pair(&s, &v).unwrap();
        let signer = CheckpointSigner::load(&s).unwrap();
        let verifier = CheckpointVerifier::load(&v).unwrap();
        assert_eq!(signer.key_id(), id);
        assert_eq!(verifier.key_id(), id);
        let sig = signer.sign(b"m");
        assert!(verifier.verify(b"m", &sig));
        assert!(!verifier.verify(b"n", &sig));
        assert!(!verifier.verify(b"m", "zz"));
        assert!(matches!(
            generate_key_pair(&s, &v),
            Err(KeyError::Exists { .. })
        ));
        // A verifying key is not a signing key.
        assert!(matches!(
            CheckpointSigner::load(&v),
            Err(KeyError::Malformed { .. })
        ));
    }
}
