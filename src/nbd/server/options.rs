//! Option payloads a client sends in negotiation (INFO/GO, LIST/SET_META_CONTEXT),
//! parsed without trusting any length in them: `None` for anything malformed.
//! ```text
//! INFO/GO:           u32 name length, name, u16 count, count × u16 info type
//! LIST/SET_META_CTX: u32 name length, name, u32 count, count × (u32 length, query)
//! ```

fn be32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn be16(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(o..o + 2)?.try_into().ok()?))
}

/// INFO/GO payload: export name and the info types requested.
pub fn parse_go(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let n = be32(data, 0)? as usize;
    let name = data.get(4..4usize.checked_add(n)?)?;
    let count = be16(data, 4 + n)? as usize;
    let mut reqs = Vec::with_capacity(count.min(16));
    for i in 0..count {
        reqs.push(be16(data, 6 + n + 2 * i)?);
    }
    if data.len() != 6 + n + 2 * count {
        return None;
    }
    Some((String::from_utf8(name.to_vec()).ok()?, reqs))
}

/// LIST/SET_META_CONTEXT payload: export name and the queries.
pub fn parse_meta(data: &[u8]) -> Option<(String, Vec<String>)> {
    let n = be32(data, 0)? as usize;
    let name = data.get(4..4usize.checked_add(n)?)?;
    let count = be32(data, 4 + n)? as usize;
    let mut pos = 8 + n;
    let mut queries = Vec::with_capacity(count.min(16));
    for _ in 0..count {
        let l = be32(data, pos)? as usize;
        let q = data.get(pos + 4..(pos + 4).checked_add(l)?)?;
        queries.push(String::from_utf8(q.to_vec()).ok()?);
        pos += 4 + l;
    }
    if pos != data.len() {
        return None;
    }
    Some((String::from_utf8(name.to_vec()).ok()?, queries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn option_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_go(&bytes);
            let _ = parse_meta(&bytes);
        }
    }

    #[test]
    fn option_payloads_parse() {
        let mut go = 3u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"abc");
        go.extend_from_slice(&2u16.to_be_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        go.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_go(&go), Some(("abc".into(), vec![0, 3])));
        assert_eq!(parse_go(&go[..go.len() - 1]), None);
        let mut m = 0u32.to_be_bytes().to_vec();
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_meta(&m),
            Some((String::new(), vec!["base:allocation".into()]))
        );
        m.push(0);
        assert_eq!(parse_meta(&m), None);
    }
}
