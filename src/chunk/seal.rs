//! Sealing: what makes a vault encrypted. Owns the vault key in memory, the keyed
//! digests and the AES-256-GCM seal/open of blob payloads and of whole files
//! (manifests). Wrapping the vault key for storage is `vault::keys`' job.
//!
//! From the 32-byte random vault key two keys are derived with `blake3::derive_key`
//! (distinct context strings, so neither reveals the other nor the vault key):
//! - the **digest key**: a chunk's digest is `blake3::keyed_hash(digest key, plaintext)`,
//!   so equal data in two vaults gets unrelated digests, and a digest says nothing about
//!   the plaintext to someone without the key;
//! - the **cipher key**: AES-256-GCM.
//!
//! A sealed blob (flags bit 0 set) keeps the 12-byte header in clear and authenticates it
//! as associated data, so kind, codec and length cannot be altered either:
//!
//! ```text
//! offset size  field
//! 0      12    blob header (see `chunk`), flags = 0x0001
//! 12     12    nonce: 96 random bits (OS RNG), fresh for every blob
//! 24     n     AES-256-GCM ciphertext of the payload (zstd bytes or the plaintext)
//! 24+n   16    GCM tag
//! ```
//!
//! A sealed file (a manifest) is:
//!
//! ```text
//! offset size  field
//! 0      4     magic "BVSF"
//! 4      1     version (1)
//! 5      12    nonce (random)
//! 17     n+16  AES-256-GCM(ciphertext ‖ tag); associated data = bytes 0..5 ‖ the
//!              file's key in the vault ("backups/<resource>/<id>.json"), so a sealed
//!              file moved to another name fails to open
//! ```
//!
//! **Nonce reuse** is excluded by bounding the number of seals per key: nonces are 96
//! random bits, and NIST SP 800-38D allows 2^32 random-nonce encryptions under one key
//! (collision chance below 2^-32). A vault seals one blob per unique chunk, index page or
//! manifest, so 2^32 seals is 256 TiB of unique data at 64 KiB chunks — beyond what one
//! vault of this appliance stores. GC repacks copy sealed blobs as they are (no new
//! seal). A vault that approaches the bound must be re-keyed (a new vault and a copy).
//!
//! What stays visible without the key: blob kinds and plaintext lengths (chunks are
//! fixed-size anyway), the number and size of packs, manifests' file names (resource and
//! backup ids: the paths under `backups/`), and vault.toml's parameters.

use std::sync::Arc;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use zeroize::Zeroizing;

use super::ChunkDigest;
use crate::error::{Error, ErrorKind, Result};

/// Bit 0 of the blob header's flags: the payload is sealed.
pub const FLAG_SEALED: u16 = 1;
/// Bytes a seal adds to a payload: nonce + tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

const DIGEST_CONTEXT: &str = "blockvault 2026-11 chunk digest key";
const CIPHER_CONTEXT: &str = "blockvault 2026-11 blob cipher key";
const CHECK_CONTEXT: &str = "blockvault 2026-11 vault key check";

const FILE_MAGIC: &[u8; 4] = b"BVSF";
const FILE_VERSION: u8 = 1;
const FILE_HEADER_LEN: usize = 5;

/// A vault key (256 random bits), wiped from memory on drop. Its `Debug` hides it.
#[derive(Clone)]
pub struct VaultKey(Zeroizing<[u8; 32]>);

impl VaultKey {
    /// A new random key (OS RNG).
    pub fn generate() -> VaultKey {
        VaultKey(Zeroizing::new(rand::random::<[u8; 32]>()))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> VaultKey {
        VaultKey(Zeroizing::new(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A value derived from the key that lets a candidate key be recognised (stored in
    /// vault.toml; reveals nothing of the key).
    pub fn check_value(&self) -> String {
        hex::encode(&blake3::derive_key(CHECK_CONTEXT, self.0.as_ref())[..16])
    }
}

impl std::fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VaultKey(<hidden>)")
    }
}

/// The derived keys of an unlocked vault.
struct Sealer {
    digest_key: Zeroizing<[u8; 32]>,
    cipher: LessSafeKey,
}

/// An AES-256-GCM key. `ring`'s implementation, not the `aes-gcm` crate's: on this
/// appliance's CPUs (AES-NI, VAES, VPCLMULQDQ) it seals about 4× faster, which is what
/// keeps an encrypted full backup within 10 % of a plaintext one.
pub(crate) fn aes_key(key: &[u8; 32]) -> Result<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| Error::new(ErrorKind::Io, "setting up AES-256-GCM failed"))
}

/// Seal `buf` in place under `key` with `nonce` and `aad`; returns the tag.
pub(crate) fn seal_detached(
    key: &LessSafeKey,
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
) -> Result<[u8; TAG_LEN]> {
    let tag = key
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
        .map_err(|_| Error::new(ErrorKind::Io, "AES-256-GCM sealing failed"))?;
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(tag.as_ref());
    Ok(out)
}

/// Open `buf` in place; false when the tag does not authenticate it (or the nonce or
/// tag has the wrong length).
pub(crate) fn open_detached(
    key: &LessSafeKey,
    nonce: &[u8],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8],
) -> bool {
    let (Ok(nonce), Ok(tag)) = (Nonce::try_assume_unique_for_key(nonce), Tag::try_from(tag)) else {
        return false;
    };
    key.open_in_place_separate_tag(nonce, Aad::from(aad), tag, buf, 0..)
        .is_ok()
}

/// How a vault's blobs are addressed and protected: plain (blake3 digests, no seal) or
/// sealed (keyed digests, AES-256-GCM). Cheap to clone (one per worker thread).
#[derive(Clone, Default)]
pub struct BlobCodec {
    sealer: Option<Arc<Sealer>>,
}

impl BlobCodec {
    /// A plaintext vault's codec.
    pub fn plain() -> BlobCodec {
        BlobCodec { sealer: None }
    }

    /// An encrypted vault's codec under `key`.
    pub fn sealed(key: &VaultKey) -> Result<BlobCodec> {
        let digest_key = Zeroizing::new(blake3::derive_key(DIGEST_CONTEXT, key.as_bytes()));
        let cipher_key = Zeroizing::new(blake3::derive_key(CIPHER_CONTEXT, key.as_bytes()));
        let cipher = aes_key(&cipher_key)?;
        Ok(BlobCodec {
            sealer: Some(Arc::new(Sealer { digest_key, cipher })),
        })
    }

    pub fn is_sealed(&self) -> bool {
        self.sealer.is_some()
    }

    /// The digest of `data` in this vault: blake3, keyed in an encrypted vault.
    pub fn digest(&self, data: &[u8]) -> ChunkDigest {
        match &self.sealer {
            None => ChunkDigest::of(data),
            Some(s) => ChunkDigest(*blake3::keyed_hash(&s.digest_key, data).as_bytes()),
        }
    }

    /// Seal `payload` for a blob whose header (flags already marking it sealed) is
    /// `header`: returns nonce ‖ ciphertext ‖ tag. Plain codec: the payload as is.
    pub fn seal_payload(&self, header: &[u8], payload: &[u8]) -> Result<Vec<u8>> {
        let Some(s) = &self.sealer else {
            return Ok(payload.to_vec());
        };
        let mut out = Vec::with_capacity(payload.len() + SEAL_OVERHEAD);
        let nonce: [u8; NONCE_LEN] = rand::random();
        out.extend_from_slice(&nonce);
        out.extend_from_slice(payload);
        let tag = seal_detached(&s.cipher, nonce, header, &mut out[NONCE_LEN..])?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Open a sealed payload into `out` (cleared first). A plain codec (the vault was
    /// opened without its key) is `KeyRequired`; an authentication failure `Corrupt`.
    pub fn open_payload(
        &self,
        header: &[u8],
        sealed: &[u8],
        out: &mut Vec<u8>,
        what: &ChunkDigest,
    ) -> Result<()> {
        let Some(s) = &self.sealer else {
            return Err(Error::new(
                ErrorKind::KeyRequired,
                format!(
                    "blob {} is sealed (encrypted vault) and no key was given: pass --keyfile PATH or --passphrase-env VAR",
                    what.short()
                ),
            ));
        };
        if sealed.len() < SEAL_OVERHEAD {
            return Err(Error::corrupt(format!(
                "sealed blob {} of {} bytes is shorter than nonce and tag",
                what.short(),
                sealed.len()
            )));
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        out.clear();
        out.extend_from_slice(ct);
        if open_detached(&s.cipher, nonce, header, out, tag) {
            return Ok(());
        }
        Err(Error::corrupt(format!(
            "blob {} fails authentication (AES-GCM tag mismatch under the vault key): its stored bytes were altered",
            what.short()
        )))
    }

    /// Seal a whole file stored under `name` in the vault (a manifest). Plain codec:
    /// the bytes as they are.
    pub fn seal_file(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>> {
        let Some(s) = &self.sealer else {
            return Ok(plain.to_vec());
        };
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut out = Vec::with_capacity(FILE_HEADER_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(FILE_MAGIC);
        out.push(FILE_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let aad = [&out[..FILE_HEADER_LEN], name.as_bytes()].concat();
        let start = FILE_HEADER_LEN + NONCE_LEN;
        let tag = seal_detached(&s.cipher, nonce, &aad, &mut out[start..])
            .map_err(|e| e.context_prefix(format!("sealing {name}")))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Whether `stored` is a sealed file (by its header; authenticity needs the key).
    pub fn is_sealed_file(stored: &[u8]) -> bool {
        stored.len() >= FILE_HEADER_LEN + NONCE_LEN + TAG_LEN && &stored[..4] == FILE_MAGIC
    }

    /// Open a file read from `name`. A sealed file without a key is `KeyRequired`; a
    /// plaintext file in an encrypted vault, or one failing authentication, `Corrupt`.
    pub fn open_file(&self, name: &str, stored: &[u8]) -> Result<Vec<u8>> {
        let is_sealed = stored.len() >= FILE_HEADER_LEN && &stored[..4] == FILE_MAGIC;
        let Some(s) = &self.sealer else {
            if is_sealed {
                return Err(Error::new(
                    ErrorKind::KeyRequired,
                    format!(
                        "{name} is sealed (encrypted vault) and no key was given: pass --keyfile PATH or --passphrase-env VAR"
                    ),
                ));
            }
            return Ok(stored.to_vec());
        };
        if !is_sealed {
            return Err(Error::corrupt(format!(
                "{name} is not sealed, but the vault is encrypted: it was not written by this vault's owner"
            )));
        }
        if stored[4] != FILE_VERSION {
            return Err(Error::unsupported(format!(
                "{name}: sealed-file version {} (this build reads {FILE_VERSION})",
                stored[4]
            )));
        }
        if stored.len() < FILE_HEADER_LEN + SEAL_OVERHEAD {
            return Err(Error::corrupt(format!(
                "sealed {name} is shorter than nonce and tag"
            )));
        }
        let (head, rest) = stored.split_at(FILE_HEADER_LEN);
        let (nonce, rest) = rest.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let aad = [head, name.as_bytes()].concat();
        let mut out = ct.to_vec();
        if !open_detached(&s.cipher, nonce, &aad, &mut out, tag) {
            return Err(Error::corrupt(format!(
                "{name} fails authentication (AES-GCM tag mismatch under the vault key): it was altered or moved"
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_digests_differ_between_keys_and_from_plain() {
        let a = BlobCodec::sealed(&VaultKey::generate()).unwrap();
        let b = BlobCodec::sealed(&VaultKey::generate()).unwrap();
        let data = b"same data in two vaults";
        assert_ne!(a.digest(data), b.digest(data));
        assert_ne!(a.digest(data), ChunkDigest::of(data));
        assert_eq!(BlobCodec::plain().digest(data), ChunkDigest::of(data));
    }

    #[test]
    fn sealed_files_open_only_under_their_key_and_name() {
        let key = VaultKey::generate();
        let c = BlobCodec::sealed(&key).unwrap();
        let sealed = c.seal_file("backups/a/1.json", b"{\"x\":1}").unwrap();
        assert!(!sealed.windows(5).any(|w| w == b"\"x\":1"));
        assert_eq!(
            c.open_file("backups/a/1.json", &sealed).unwrap(),
            b"{\"x\":1}"
        );
        let moved = c.open_file("backups/b/1.json", &sealed).unwrap_err();
        assert_eq!(moved.kind(), ErrorKind::Corrupt);
        let other = BlobCodec::sealed(&VaultKey::generate()).unwrap();
        assert_eq!(
            other
                .open_file("backups/a/1.json", &sealed)
                .unwrap_err()
                .kind(),
            ErrorKind::Corrupt
        );
        let locked = BlobCodec::plain().open_file("backups/a/1.json", &sealed);
        assert_eq!(locked.unwrap_err().kind(), ErrorKind::KeyRequired);
        let plain = c.open_file("backups/a/1.json", b"{\"x\":1}").unwrap_err();
        assert_eq!(plain.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn key_debug_hides_the_key() {
        let k = VaultKey::from_bytes([0xab; 32]);
        assert!(!format!("{k:?}").contains("ab"));
    }
}
