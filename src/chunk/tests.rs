//! Tests of blob encoding and decoding (round trips, hostile headers, properties).

use super::*;
use proptest::prelude::*;

#[test]
fn zero_detection() {
    assert!(is_zero(&[0u8; 65536]));
    assert!(is_zero(&[0u8; 37]));
    assert!(is_zero(&[]));
    let mut b = vec![0u8; 65536];
    b[65535] = 1;
    assert!(!is_zero(&b));
    b[65535] = 0;
    b[3] = 1;
    assert!(!is_zero(&b));
    let mut b = vec![0u8; 37];
    b[36] = 9;
    assert!(!is_zero(&b));
}

#[test]
fn chunk_size_parsing() {
    assert_eq!(ChunkSize::parse("64K").unwrap().bytes(), 65536);
    assert_eq!(ChunkSize::parse("1m").unwrap().bytes(), 1 << 20);
    assert_eq!(ChunkSize::parse("16384").unwrap().bytes(), 16384);
    assert!(ChunkSize::parse("8K").is_err());
    assert!(ChunkSize::parse("96K").is_err());
    assert!(ChunkSize::parse("8M").is_err());
    assert!(ChunkSize::parse("x").is_err());
}

#[test]
fn compressible_and_random_round_trip() {
    let mut enc = Encoder::new(1, &BlobCodec::plain()).unwrap();
    let text = b"hello world ".repeat(5000);
    let d = ChunkDigest::of(&text);
    let blob = enc.encode(BlobKind::Data, d, text.clone()).unwrap();
    assert!(blob.payload.len() < text.len() / 10);
    let stored = [&blob.header[..], &blob.payload].concat();
    assert_eq!(
        decode_blob(&stored, &d, &BlobCodec::plain()).unwrap().1,
        text
    );

    let random: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let d = ChunkDigest::of(&random);
    let blob = enc.encode(BlobKind::Data, d, random.clone()).unwrap();
    let stored = [&blob.header[..], &blob.payload].concat();
    assert_eq!(
        decode_blob(&stored, &d, &BlobCodec::plain()).unwrap().1,
        random
    );
}

#[test]
fn flipped_byte_is_corrupt() {
    let mut enc = Encoder::new(1, &BlobCodec::plain()).unwrap();
    let text = b"abcdefgh".repeat(1000);
    let d = ChunkDigest::of(&text);
    let blob = enc.encode(BlobKind::Data, d, text).unwrap();
    let mut stored = [&blob.header[..], &blob.payload].concat();
    let last = stored.len() - 1;
    stored[last] ^= 0x40;
    let err = decode_blob(&stored, &d, &BlobCodec::plain()).unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
}

#[test]
fn sealed_blobs_round_trip_and_refuse_tampering() {
    let codec = BlobCodec::sealed(&VaultKey::generate()).unwrap();
    let mut enc = Encoder::new(1, &codec).unwrap();
    let random: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for plain in [b"marker text ".repeat(5000), random] {
        let d = codec.digest(&plain);
        let blob = enc.encode(BlobKind::Data, d, plain.clone()).unwrap();
        let stored = [&blob.header[..], &blob.payload].concat();
        assert!(parse_blob_header(&stored).unwrap().sealed);
        assert!(!stored.windows(12).any(|w| w == &plain[..12]));
        assert_eq!(decode_blob(&stored, &d, &codec).unwrap().1, plain);
        let mut dec = Decoder::new(&codec).unwrap();
        assert_eq!(dec.decode(&stored, &d).unwrap().1, &plain[..]);
        // Without the key: KeyRequired, not corrupt.
        let locked = decode_blob(&stored, &d, &BlobCodec::plain()).unwrap_err();
        assert_eq!(locked.kind(), crate::ErrorKind::KeyRequired);
        // Any flipped bit (payload or header): an authentication failure.
        for pos in [5, 8, 20, stored.len() / 2, stored.len() - 1] {
            let mut bad = stored.clone();
            bad[pos] ^= 0x01;
            let err = decode_blob(&bad, &d, &codec).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Corrupt, "flip at {pos}");
        }
    }
    // A plaintext blob slipped into an encrypted vault is refused.
    let plain = b"abc".repeat(100);
    let d = codec.digest(&plain);
    let blob = Encoder::new(1, &BlobCodec::plain())
        .unwrap()
        .encode(BlobKind::Data, d, plain)
        .unwrap();
    let stored = [&blob.header[..], &blob.payload].concat();
    let err = decode_blob(&stored, &d, &codec).unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
}

proptest! {
    // Failure seeds are kept beside this file (tests.proptest-regressions), re-run first.
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode_blob(&bytes, &ChunkDigest::ZERO, &BlobCodec::plain());
    }

    #[test]
    fn decoder_never_returns_wrong_plaintext(data in proptest::collection::vec(any::<u8>(), 1..3000), pos in any::<usize>(), bit in 0u8..8) {
        let mut enc = Encoder::new(1, &BlobCodec::plain()).unwrap();
        let d = ChunkDigest::of(&data);
        let blob = enc.encode(BlobKind::Data, d, data.clone()).unwrap();
        let mut stored = [&blob.header[..], &blob.payload].concat();
        let p = pos % stored.len();
        stored[p] ^= 1 << bit;
        // A flip may land on a bit zstd ignores; what must never happen is a
        // decode that returns different plaintext.
        if let Ok((_, plain)) = decode_blob(&stored, &d, &BlobCodec::plain()) {
            prop_assert_eq!(plain, data.clone());
        }
        // The reusing decoder agrees with decode_blob, on good and damaged blobs.
        let mut dec = Decoder::new(&BlobCodec::plain()).unwrap();
        let good = [&blob.header[..], &blob.payload].concat();
        prop_assert_eq!(dec.decode(&good, &d).unwrap().1, &data[..]);
        match (decode_blob(&stored, &d, &BlobCodec::plain()), dec.decode(&stored, &d)) {
            (Ok((_, a)), Ok((_, b))) => prop_assert_eq!(&a[..], b),
            (Err(_), Err(_)) => {}
            (a, b) => prop_assert!(false, "decode_blob {:?} vs Decoder {:?}", a.is_ok(), b.is_ok()),
        }
    }
}
