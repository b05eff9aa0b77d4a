//! Secrets and how they are shown: never in clear. Redis passwords (the
//! broker URL's, and `broker.sentinel_password`) and the publish token
//! print as `***` in logs, in `pollgate check` and in errors.

/// `url` with the password of its user-info (`redis://user:pw@host`, or a
/// lone `redis://pw@host`) replaced by `***`; URLs without one unchanged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The user-info ends at the last '@' (a password may hold '/' or '@';
    // over-redacting a rare '@' in a query is the safe side).
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    let user = match rest[..at].split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{scheme}://{user}{}", &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::redact_url;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Whatever the password holds, it is not in the shown URL.
        #[test]
        fn passwords_never_show(pw in "[a-zA-Z0-9/@:?#%]{6,20}", db in 0u8..16) {
            let url = format!("redis://user:{pw}@host:6379/{db}");
            let shown = redact_url(&url);
            prop_assert!(!shown.contains(&pw), "{}", shown);
            let tail = format!("@host:6379/{db}");
            prop_assert!(shown.ends_with(&tail), "{}", shown);
        }
    }
}
