//! Identity patterns: which certificate identities (URI SANs) a `peers`
//! entry or a policy rule admits. `*` stands for one or more characters of
//! one path segment (never a `/`), and only in the path: a pattern never
//! spans trust domains. `spiffe://example.org/node/*` admits every node of
//! the fleet, so a new node needs no config change anywhere, while each
//! connection stays bound to the exact identity its certificate carries.

use std::fmt;

/// Most `*` a pattern may hold: matching stays cheap whatever a peer's
/// certificate says.
const MAX_WILDCARDS: usize = 4;
/// The longest pattern or identity considered; a certificate's URI SAN
/// beyond it matches nothing.
pub const MAX_IDENTITY_LEN: usize = 1024;

/// A parsed identity pattern.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdentityPattern {
    text: String,
    /// The literal pieces between the `*`s (one piece: an exact identity).
    pieces: Vec<String>,
}

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("`{0}` is not a URI (expected e.g. spiffe://example.org/connector/a)")]
    NotUri(String),
    #[error("`{0}`: `*` may stand only in the path, after the trust domain")]
    WildcardOutsidePath(String),
    #[error("`{0}`: `**` is not a pattern (`*` already matches a whole segment)")]
    DoubleWildcard(String),
    #[error("`{0}`: at most {MAX_WILDCARDS} `*`")]
    TooManyWildcards(String),
    #[error("longer than {MAX_IDENTITY_LEN} bytes")]
    TooLong,
}

impl IdentityPattern {
    pub fn parse(text: &str) -> Result<IdentityPattern, PatternError> {
        if text.len() > MAX_IDENTITY_LEN {
            return Err(PatternError::TooLong);
        }
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(PatternError::NotUri(text.to_owned()));
        };
        if scheme.is_empty() || rest.is_empty() || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(PatternError::NotUri(text.to_owned()));
        }
        let authority = rest.split('/').next().unwrap_or_default();
        if scheme.contains('*') || authority.contains('*') {
            return Err(PatternError::WildcardOutsidePath(text.to_owned()));
        }
        if authority.is_empty() && scheme != "file" {
            return Err(PatternError::NotUri(text.to_owned()));
        }
        if text.contains("**") {
            return Err(PatternError::DoubleWildcard(text.to_owned()));
        }
        let pieces: Vec<String> = text.split('*').map(str::to_owned).collect();
        if pieces.len() - 1 > MAX_WILDCARDS {
            return Err(PatternError::TooManyWildcards(text.to_owned()));
        }
        Ok(IdentityPattern { text: text.to_owned(), pieces })
    }

    /// No wildcard: admits one identity only.
    pub fn is_exact(&self) -> bool {
        self.pieces.len() == 1
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `identity` is one this pattern admits.
    pub fn matches(&self, identity: &str) -> bool {
        // A certificate may carry control characters in its URI SAN; such
        // an identity is admitted by nothing (and so never reaches a log
        // line unescaped).
        if identity.len() > MAX_IDENTITY_LEN || identity.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return false;
        }
        let (first, rest) = self.pieces.split_first().expect("split yields at least one piece");
        let Some(tail) = identity.strip_prefix(first.as_str()) else { return false };
        if rest.is_empty() {
            return tail.is_empty();
        }
        wildcards_match(tail, rest)
    }
}

/// `s` against `*piece[0]*piece[1]...` where each `*` is one or more
/// characters other than `/`. A set of reachable positions per piece, not
/// backtracking: at most four wildcards over at most 1,024 bytes is a few
/// million byte comparisons in the worst case, whatever a certificate holds.
fn wildcards_match(s: &str, pieces: &[String]) -> bool {
    let bytes = s.as_bytes();
    let n = bytes.len();
    // next_slash[i]: index of the first `/` at or after i (n if none).
    let mut next_slash = vec![n; n + 1];
    for i in (0..n).rev() {
        next_slash[i] = if bytes[i] == b'/' { i } else { next_slash[i + 1] };
    }
    let mut at = vec![false; n + 1];
    at[0] = true;
    for piece in pieces {
        let mut next = vec![false; n + 1];
        for p in (0..=n).filter(|&p| at[p]) {
            // The wildcard takes s[p..q]: one character at least, no `/`.
            for q in p + 1..=next_slash[p] {
                if s.is_char_boundary(q) && s[q..].starts_with(piece.as_str()) {
                    next[q + piece.len()] = true;
                }
            }
        }
        at = next;
    }
    at[n]
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityPattern({:?})", self.text)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn p(s: &str) -> IdentityPattern {
        IdentityPattern::parse(s).expect("valid pattern")
    }

    #[test]
    fn a_wildcard_is_one_segment_or_part_of_one() {
        let nodes = p("spiffe://example.org/node/*");
        assert!(!nodes.is_exact());
        assert!(nodes.matches("spiffe://example.org/node/worker-1"));
        assert!(!nodes.matches("spiffe://example.org/node/"), "one character at least");
        assert!(!nodes.matches("spiffe://example.org/node/a/b"), "never across a `/`");
        assert!(!nodes.matches("spiffe://example.org/node/a\nforged"), "no control characters");
        assert!(!nodes.matches("spiffe://example.org/node/a b"), "no spaces");
        assert!(!nodes.matches("spiffe://example.org/nodes/a"));
        assert!(!nodes.matches("spiffe://evil.org/node/a"));
        let ci = p("spiffe://example.org/node/ci-*");
        assert!(ci.matches("spiffe://example.org/node/ci-7"));
        assert!(!ci.matches("spiffe://example.org/node/prod-7"));
        let mid = p("spiffe://example.org/*/edge");
        assert!(mid.matches("spiffe://example.org/eu/edge"));
        assert!(!mid.matches("spiffe://example.org/eu/west/edge"));
        let two = p("spiffe://example.org/ns/*/sa/*-runner");
        assert!(two.matches("spiffe://example.org/ns/ci/sa/gh-runner"));
        assert!(!two.matches("spiffe://example.org/ns/ci/sa/-runner"));
        let exact = p("spiffe://example.org/connector/a");
        assert!(exact.is_exact());
        assert!(exact.matches("spiffe://example.org/connector/a"));
        assert!(!exact.matches("spiffe://example.org/connector/ab"));
    }

    #[test]
    fn patterns_that_could_span_trust_domains_are_refused() {
        for (bad, want) in [
            ("spiffe://*/node/a", "only in the path"),
            ("spiffe://example.*/node/a", "only in the path"),
            ("*://example.org/a", "only in the path"),
            ("spiffe://example.org/**", "`**`"),
            ("no-scheme", "not a URI"),
            ("spiffe://", "not a URI"),
            ("spiffe://example.org/a b", "not a URI"),
            ("spiffe://e/*/*/*/*/*", "at most 4"),
        ] {
            let e = IdentityPattern::parse(bad).expect_err(bad).to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert_eq!(IdentityPattern::parse(&"x".repeat(2000)), Err(PatternError::TooLong));
    }

    #[test]
    fn a_hostile_identity_does_not_make_matching_explode() {
        // Backtracking would try about 10^12 splits here.
        let pat = p("spiffe://e/*a*a*a*a");
        let id = format!("spiffe://e/{}b", "a".repeat(1000));
        assert!(!pat.matches(&id));
        assert!(pat.matches(&format!("spiffe://e/{}", "a".repeat(1000))));
    }

    proptest! {
        /// An exact pattern admits exactly its own text.
        #[test]
        fn an_exact_pattern_admits_only_itself(seg in "[a-z0-9.-]{1,20}", other in "[a-z0-9./-]{0,24}") {
            let id = format!("spiffe://example.org/{seg}");
            let pat = p(&id);
            prop_assert!(pat.matches(&id));
            prop_assert_eq!(pat.matches(&format!("spiffe://example.org/{other}")), other == seg);
        }

        /// A trailing `*` admits a segment exactly when it is non-empty and
        /// has no `/`, whatever it holds otherwise.
        #[test]
        fn a_trailing_wildcard_admits_one_whole_segment(seg in "[a-z0-9*/.-]{0,24}") {
            let pat = p("spiffe://example.org/node/*");
            let id = format!("spiffe://example.org/node/{seg}");
            prop_assert_eq!(pat.matches(&id), !seg.is_empty() && !seg.contains('/'));
        }

        /// Matching never panics on what a certificate may carry.
        #[test]
        fn any_identity_is_matched_without_panicking(id in "\\PC{0,300}") {
            let pat = p("spiffe://example.org/a*b/*c*/*");
            let _ = pat.matches(&id);
        }
    }
}
