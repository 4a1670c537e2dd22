//! What a plugin says about itself when it is loaded, before any hook is called.

use serde::{Deserialize, Serialize};

use crate::hooks::Hook;
use crate::version::ApiVersion;

/// A plugin's self-description.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The name configs and messages use (`liger`, `math_reward`); lowercase letters, digits
    /// and `_`.
    pub name: String,
    /// The plugin's own version (semver).
    pub version: String,
    /// The API version it was built against.
    pub api_version: ApiVersion,
    /// A one-line description.
    #[serde(default)]
    pub description: String,
    /// The hooks it implements; the host calls no others.
    pub hooks: Vec<Hook>,
    /// The top-level config keys it owns, as a JSON-schema `properties` object (key → schema).
    /// Two plugins claiming one key is an error; so is a key the host itself owns.
    #[serde(default)]
    pub config_schema: serde_json::Map<String, serde_json::Value>,
    /// Named things it provides, which configs select by name.
    #[serde(default)]
    pub provides: Provides,
}

/// The named things a plugin provides (each list empty when absent).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Provides {
    /// Dataset `type:` values it formats ([`Hook::FormatExample`]).
    pub strategies: Vec<String>,
    /// Reward functions ([`Hook::Reward`]).
    pub rewards: Vec<String>,
    /// Losses ([`Hook::ComputeLoss`]).
    pub losses: Vec<String>,
    /// Kernel choices it may make ([`Hook::PreModelLoad`]).
    pub kernels: Vec<String>,
    /// Experiment trackers it reports to.
    pub trackers: Vec<String>,
    /// CLI subcommands ([`Hook::Commands`]).
    pub commands: Vec<String>,
}

/// Why a manifest cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The name is empty or has characters other than lowercase letters, digits and `_`.
    #[error("plugin name `{0}` must be lowercase letters, digits and `_`, starting with a letter")]
    BadName(String),
    /// The plugin lists a hook twice.
    #[error("plugin `{plugin}` lists hook `{hook}` twice", hook = .hook.name())]
    RepeatedHook {
        /// The plugin.
        plugin: String,
        /// The hook.
        hook: Hook,
    },
    /// The plugin provides a strategy, reward or loss without the hook that serves it.
    #[error("plugin `{plugin}` provides {what} but does not implement `{hook}`", hook = .hook.name())]
    MissingHook {
        /// The plugin.
        plugin: String,
        /// What it provides.
        what: String,
        /// The hook that would serve it.
        hook: Hook,
    },
}

impl Manifest {
    /// Checks the manifest's own consistency (not its API version: see
    /// [`ApiVersion::loads`]).
    pub fn validate(&self) -> Result<(), ManifestError> {
        let name_ok = self.name.starts_with(|c: char| c.is_ascii_lowercase())
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !name_ok {
            return Err(ManifestError::BadName(self.name.clone()));
        }
        for (i, hook) in self.hooks.iter().enumerate() {
            if self.hooks[..i].contains(hook) {
                return Err(ManifestError::RepeatedHook {
                    plugin: self.name.clone(),
                    hook: *hook,
                });
            }
        }
        let served = [
            (
                &self.provides.strategies,
                "dataset types",
                Hook::FormatExample,
            ),
            (&self.provides.rewards, "rewards", Hook::Reward),
            (&self.provides.losses, "losses", Hook::ComputeLoss),
            (&self.provides.commands, "commands", Hook::Commands),
        ];
        for (names, what, hook) in served {
            if !names.is_empty() && !self.hooks.contains(&hook) {
                return Err(ManifestError::MissingHook {
                    plugin: self.name.clone(),
                    what: format!("{what} ({})", names.join(", ")),
                    hook,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::API_VERSION;

    fn manifest() -> Manifest {
        Manifest {
            name: "math_reward".into(),
            version: "0.1.0".into(),
            api_version: API_VERSION,
            description: String::new(),
            hooks: vec![Hook::Reward],
            config_schema: Default::default(),
            provides: Provides {
                rewards: vec!["exact_answer".into()],
                ..Provides::default()
            },
        }
    }

    #[test]
    fn a_consistent_manifest_validates_and_round_trips_through_json() {
        let m = manifest();
        m.validate().unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
    }

    #[test]
    fn bad_names_repeated_hooks_and_unserved_provisions_are_refused() {
        let mut m = manifest();
        m.name = "Math-Reward".into();
        assert_eq!(
            m.validate().unwrap_err().to_string(),
            "plugin name `Math-Reward` must be lowercase letters, digits and `_`, starting with a letter"
        );
        let mut m = manifest();
        m.hooks.push(Hook::Reward);
        assert!(matches!(
            m.validate(),
            Err(ManifestError::RepeatedHook { .. })
        ));
        let mut m = manifest();
        m.hooks.clear();
        assert_eq!(
            m.validate().unwrap_err().to_string(),
            "plugin `math_reward` provides rewards (exact_answer) but does not implement `reward`"
        );
    }
}
