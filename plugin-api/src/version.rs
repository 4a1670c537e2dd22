//! The API version a plugin is built against, and whether a host can load it.
//!
//! The API follows semver: a host loads a plugin built against the same major version and a
//! minor version no newer than its own (the plugin may not use what the host lacks). Before
//! 1.0, the minor version plays the major's part, as Cargo treats `0.x`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A semver version of the plugin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ApiVersion {
    /// Incompatible changes.
    pub major: u32,
    /// Additions.
    pub minor: u32,
    /// Fixes.
    pub patch: u32,
}

/// The version of the API this crate defines.
pub const API_VERSION: ApiVersion = ApiVersion {
    major: 0,
    minor: 2,
    patch: 0,
};

impl ApiVersion {
    /// Whether a host implementing `self` can load a plugin built against `plugin`.
    pub fn loads(self, plugin: ApiVersion) -> bool {
        if self.major == 0 {
            plugin.major == 0 && plugin.minor == self.minor
        } else {
            plugin.major == self.major && plugin.minor <= self.minor
        }
    }

    /// Parses `MAJOR.MINOR.PATCH`.
    pub fn parse(text: &str) -> Option<ApiVersion> {
        let mut parts = text.trim().split('.').map(|p| p.parse::<u32>().ok());
        let version = ApiVersion {
            major: parts.next()??,
            minor: parts.next()??,
            patch: parts.next()??,
        };
        parts.next().is_none().then_some(version)
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::ApiVersion;

    fn v(text: &str) -> ApiVersion {
        ApiVersion::parse(text).unwrap()
    }

    #[test]
    fn same_major_and_older_minor_load_and_nothing_else_does() {
        assert!(v("1.4.0").loads(v("1.2.7")));
        assert!(v("1.4.0").loads(v("1.4.9")));
        assert!(!v("1.4.0").loads(v("1.5.0")));
        assert!(!v("2.0.0").loads(v("1.9.0")));
        assert!(v("0.1.3").loads(v("0.1.0")));
        assert!(!v("0.2.0").loads(v("0.1.0")));
        assert!(!v("0.1.0").loads(v("0.2.0")));
        assert_eq!(ApiVersion::parse("1.2"), None);
        assert_eq!(ApiVersion::parse("1.2.3.4"), None);
        assert_eq!(v("0.1.0").to_string(), "0.1.0");
    }

    #[test]
    fn the_api_version_is_the_crate_version() {
        // Native libraries are checked against the crate version by `abi_stable` and against
        // `API_VERSION` by the host: the two must be one number.
        assert_eq!(super::API_VERSION.to_string(), env!("CARGO_PKG_VERSION"));
    }
}
