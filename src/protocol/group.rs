//! Group names (PROTOCOL.md §10): lowercase, up to four `/`-separated
//! levels, each `[a-z0-9][a-z0-9_.-]{0,63}`. A member of `eng/backend` is
//! reached by `@eng`: a name is within its ancestors.

/// Most levels in a group name (`a/b/c/d`).
const MAX_LEVELS: usize = 4;
/// Most bytes in one level.
const MAX_LEVEL_LEN: usize = 64;

/// A valid group name, in lowercase.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupName(Box<str>);

impl GroupName {
    /// Validates `name` compared in lowercase; `None` when it does not match.
    pub fn parse(name: &str) -> Option<GroupName> {
        let lower = name.to_ascii_lowercase();
        let mut levels = 0;
        for level in lower.split('/') {
            levels += 1;
            let bytes = level.as_bytes();
            let valid = levels <= MAX_LEVELS
                && !bytes.is_empty()
                && bytes.len() <= MAX_LEVEL_LEN
                && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
                && bytes[1..].iter().all(|&b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
                });
            if !valid {
                return None;
            }
        }
        Some(GroupName(lower.into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a member of `self` is reached by `@ancestor`: the same group
    /// or one below it.
    pub fn is_within(&self, ancestor: &GroupName) -> bool {
        match self.0.strip_prefix(&*ancestor.0) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_pattern_in_lowercase() {
        for ok in [
            "eng",
            "ENG",
            "eng/backend",
            "a/b/c/d",
            "0x.y_z-w",
            &"a".repeat(64),
        ] {
            assert!(GroupName::parse(ok).is_some(), "{ok}");
        }
        assert_eq!(GroupName::parse("Eng/API").unwrap().as_str(), "eng/api");
        let long = "a".repeat(65);
        for bad in [
            "",
            "/eng",
            "eng/",
            "eng//x",
            "_eng",
            "-x",
            ".x",
            "a/b/c/d/e",
            "e ng",
            "é",
            "a/_b",
            &long,
        ] {
            assert!(GroupName::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_group_is_within_itself_and_its_ancestors_only() {
        let name = |s| GroupName::parse(s).unwrap();
        assert!(name("eng/backend").is_within(&name("eng")));
        assert!(name("eng").is_within(&name("eng")));
        assert!(!name("eng").is_within(&name("eng/backend")));
        assert!(!name("engineering").is_within(&name("eng")));
        assert!(!name("ops/eng").is_within(&name("eng")));
    }
}
