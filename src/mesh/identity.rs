//! How a hello names a session, on this node and in other nodes' parts
//! (PROTOCOL.md §9, README "Several nodes"): the rule, and the hash of a
//! `sessionId` that parts carry.

/// A `sessionId` as other nodes know it (README "Several nodes"): client
/// text may hold tabs and newlines, a hash does not; the node that has the
/// session compares the id itself. FNV-1a, written here because every node
/// must agree on it whatever its build.
pub fn session_hash(session_id: &str) -> u64 {
    session_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// Whether a hello (its session key, if a `session_hello`) names a session
/// (its key, if it has one): a `session_hello` by its key whatever its
/// `sessionId`, a `hello` by its `sessionId` (`same_id`), never the one
/// the other.
pub fn names_session(
    key: Option<&str>,
    theirs: Option<&str>,
    same_id: impl FnOnce() -> bool,
) -> bool {
    match (key, theirs) {
        (Some(key), Some(theirs)) => key == theirs,
        (None, None) => same_id(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_names_a_session_by_key_or_by_session_id_never_across() {
        let never = || panic!("a key decides alone");
        assert!(names_session(Some("k"), Some("k"), never));
        assert!(!names_session(Some("k"), Some("j"), never));
        assert!(names_session(None, None, || true));
        assert!(!names_session(None, None, || false));
        assert!(!names_session(Some("k"), None, || true));
        assert!(!names_session(None, Some("k"), || true));
        assert_eq!(session_hash(""), 0xcbf2_9ce4_8422_2325, "FNV-1a offset");
        assert_ne!(session_hash("a\tb"), session_hash("a\nb"));
    }
}
