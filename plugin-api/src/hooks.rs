//! The hook points: when each runs, and how the results of several plugins combine.
//!
//! A run calls the plugins that implement a hook in the order of the config's `plugins:` list.
//! How their results become one is fixed per hook ([`Hook::combine`]), never left to the
//! plugins: the combiners here ([`first`], [`at_most_one`], [`merge`]) are what the host uses.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A moment of a run at which plugins are called.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    /// After the config is validated, before anything heavy: check the plugin's own keys.
    Configure,
    /// Before the datasets are read: supply the rows instead of the configured files.
    LoadDatasets,
    /// During preprocessing, per row of a dataset whose `type:` the plugin provides: turn the
    /// row into text with trainable spans.
    FormatExample,
    /// Before the weights are loaded: choose kernels and attention implementations.
    PreModelLoad,
    /// After the architecture is built from `config.json`, before adapters.
    PostModelBuild,
    /// Before LoRA adapters are created or loaded.
    PreLoraLoad,
    /// After LoRA adapters are created or loaded.
    PostLoraLoad,
    /// The model is final: set which parameters train.
    PostModelLoad,
    /// Trainer setup: supply the optimizer.
    CreateOptimizer,
    /// Every optimizer step: supply the learning rate.
    LrSchedule,
    /// Every micro-step: compute the loss and its gradient with respect to the logits.
    ComputeLoss,
    /// After the backward pass, before clipping and the optimizer step: edit gradients.
    OnGradients,
    /// Before the first step (also after a resume).
    OnTrainBegin,
    /// After every optimizer step.
    OnStepEnd,
    /// Whenever a step's metrics are logged.
    OnLog,
    /// After every evaluation.
    OnEvaluate,
    /// After every checkpoint is written.
    OnSave,
    /// After the last step, before the final save.
    OnTrainEnd,
    /// When completions are scored (RL): one score per completion.
    Reward,
    /// Once, after the final save.
    PostTrain,
    /// When the command line is parsed: extra subcommands.
    Commands,
    /// When training fails or is interrupted (the event's `message` says why).
    OnError,
}

/// How the results of the plugins that implement a hook combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// Every plugin runs, in list order. For hooks that return a verdict, any error aborts the
    /// run; for events, a failure is reported with the plugin's name (see [`Hook::fatal`]).
    All,
    /// The first plugin, in list order, that returns something wins; later ones are not asked.
    First,
    /// At most one plugin may return something; a second is an error naming both.
    AtMostOne,
    /// Results are maps merged key by key; two plugins giving one key different values is an
    /// error naming the key and both plugins.
    Merge,
    /// The call goes to the first plugin, in load order, that provides the named item (a
    /// dataset `type:`, a reward function, a loss).
    Provider,
}

impl Hook {
    /// Every hook, in the order a training run reaches them.
    pub const ALL: [Hook; 22] = [
        Hook::Commands,
        Hook::Configure,
        Hook::LoadDatasets,
        Hook::FormatExample,
        Hook::PreModelLoad,
        Hook::PostModelBuild,
        Hook::PreLoraLoad,
        Hook::PostLoraLoad,
        Hook::PostModelLoad,
        Hook::CreateOptimizer,
        Hook::LrSchedule,
        Hook::OnTrainBegin,
        Hook::ComputeLoss,
        Hook::OnGradients,
        Hook::OnStepEnd,
        Hook::OnLog,
        Hook::OnEvaluate,
        Hook::OnSave,
        Hook::Reward,
        Hook::OnTrainEnd,
        Hook::PostTrain,
        Hook::OnError,
    ];

    /// Every hook, in declaration order: the order of the WIT `hook` enum.
    pub const DECLARED: [Hook; 22] = [
        Hook::Configure,
        Hook::LoadDatasets,
        Hook::FormatExample,
        Hook::PreModelLoad,
        Hook::PostModelBuild,
        Hook::PreLoraLoad,
        Hook::PostLoraLoad,
        Hook::PostModelLoad,
        Hook::CreateOptimizer,
        Hook::LrSchedule,
        Hook::ComputeLoss,
        Hook::OnGradients,
        Hook::OnTrainBegin,
        Hook::OnStepEnd,
        Hook::OnLog,
        Hook::OnEvaluate,
        Hook::OnSave,
        Hook::OnTrainEnd,
        Hook::Reward,
        Hook::PostTrain,
        Hook::Commands,
        Hook::OnError,
    ];

    /// The hook at `index` of [`Hook::DECLARED`] (a WIT `hook` enum value).
    pub fn from_index(index: u8) -> Option<Hook> {
        Hook::DECLARED.get(usize::from(index)).copied()
    }

    /// The hook's index in [`Hook::DECLARED`].
    pub fn index(self) -> u8 {
        self as u8
    }

    /// The hook's name as configs, manifests and messages spell it (`on_step_end`).
    pub fn name(self) -> &'static str {
        match self {
            Hook::Configure => "configure",
            Hook::LoadDatasets => "load_datasets",
            Hook::FormatExample => "format_example",
            Hook::PreModelLoad => "pre_model_load",
            Hook::PostModelBuild => "post_model_build",
            Hook::PreLoraLoad => "pre_lora_load",
            Hook::PostLoraLoad => "post_lora_load",
            Hook::PostModelLoad => "post_model_load",
            Hook::CreateOptimizer => "create_optimizer",
            Hook::LrSchedule => "lr_schedule",
            Hook::ComputeLoss => "compute_loss",
            Hook::OnGradients => "on_gradients",
            Hook::OnTrainBegin => "on_train_begin",
            Hook::OnStepEnd => "on_step_end",
            Hook::OnLog => "on_log",
            Hook::OnEvaluate => "on_evaluate",
            Hook::OnSave => "on_save",
            Hook::OnTrainEnd => "on_train_end",
            Hook::Reward => "reward",
            Hook::PostTrain => "post_train",
            Hook::Commands => "commands",
            Hook::OnError => "on_error",
        }
    }

    /// The hook named `name` ([`Hook::name`]).
    pub fn from_name(name: &str) -> Option<Hook> {
        Hook::ALL.into_iter().find(|h| h.name() == name)
    }

    /// How the results of several plugins combine.
    pub fn combine(self) -> Combine {
        match self {
            _ if !self.fatal() => Combine::All,
            Hook::Configure
            | Hook::PostModelBuild
            | Hook::PreLoraLoad
            | Hook::PostLoraLoad
            | Hook::OnGradients
            | Hook::Commands => Combine::All,
            Hook::LoadDatasets => Combine::AtMostOne,
            Hook::PreModelLoad | Hook::PostModelLoad => Combine::Merge,
            Hook::FormatExample | Hook::Reward => Combine::Provider,
            _ => Combine::First,
        }
    }

    /// Whether a plugin's failure in this hook stops the run. Observational hooks (the loop
    /// events and `post_train`) report a failure with the plugin's name and, under
    /// `on_error: skip`, let training go on; every other hook shapes the run, so its failure
    /// stops it.
    pub fn fatal(self) -> bool {
        !matches!(
            self,
            Hook::OnTrainBegin
                | Hook::OnStepEnd
                | Hook::OnLog
                | Hook::OnEvaluate
                | Hook::OnSave
                | Hook::OnTrainEnd
                | Hook::PostTrain
                | Hook::OnError
        )
    }
}

/// A result and the plugin it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Contribution<T> {
    /// The plugin's name.
    pub plugin: String,
    /// What it returned.
    pub value: T,
}

/// Two plugins' results that cannot both hold.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CombineError {
    /// A hook that takes at most one result got two.
    #[error("plugins `{first}` and `{second}` both answer `{hook}`, which takes one answer; remove one of them from `plugins:`", hook = .hook.name())]
    TwoAnswers {
        /// The hook.
        hook: Hook,
        /// The earlier plugin in the list.
        first: String,
        /// The later plugin.
        second: String,
    },
    /// Two plugins set one key of a merged result to different values.
    #[error("plugins `{first}` and `{second}` disagree on `{key}` in `{hook}` ({first_value} vs {second_value})", hook = .hook.name())]
    Conflict {
        /// The hook.
        hook: Hook,
        /// The key both set.
        key: String,
        /// The earlier plugin in the list.
        first: String,
        /// Its value, as JSON.
        first_value: String,
        /// The later plugin.
        second: String,
        /// Its value, as JSON.
        second_value: String,
    },
}

impl<T> Contribution<Option<T>> {
    /// The answer with its plugin, if the plugin answered.
    pub fn answered(self) -> Option<Contribution<T>> {
        let plugin = self.plugin;
        self.value.map(|value| Contribution { plugin, value })
    }
}

/// [`Combine::First`]: the first result in list order.
pub fn first<T>(
    results: impl IntoIterator<Item = Contribution<Option<T>>>,
) -> Option<Contribution<T>> {
    results.into_iter().find_map(|c| c.answered())
}

/// [`Combine::AtMostOne`]: the only result, none, or an error naming the first two plugins
/// that answered.
pub fn at_most_one<T>(
    hook: Hook,
    results: impl IntoIterator<Item = Contribution<Option<T>>>,
) -> Result<Option<Contribution<T>>, CombineError> {
    let mut answered = results.into_iter().filter_map(|c| c.answered());
    let only = answered.next();
    match (only, answered.next()) {
        (Some(first), Some(second)) => Err(CombineError::TwoAnswers {
            hook,
            first: first.plugin,
            second: second.plugin,
        }),
        (only, None) => Ok(only),
        (None, Some(_)) => unreachable!("a second answer implies a first"),
    }
}

/// [`Combine::Merge`]: one map of every key any plugin set, each with the plugin that set it.
/// Two plugins may set one key to the same value; different values are an error.
pub fn merge(
    hook: Hook,
    results: impl IntoIterator<Item = Contribution<BTreeMap<String, serde_json::Value>>>,
) -> Result<BTreeMap<String, Contribution<serde_json::Value>>, CombineError> {
    let mut merged: BTreeMap<String, Contribution<serde_json::Value>> = BTreeMap::new();
    for result in results {
        for (key, value) in result.value {
            match merged.get(&key) {
                Some(earlier) if earlier.value != value => {
                    return Err(CombineError::Conflict {
                        hook,
                        key,
                        first: earlier.plugin.clone(),
                        first_value: earlier.value.to_string(),
                        second: result.plugin,
                        second_value: value.to_string(),
                    });
                }
                Some(_) => {}
                None => {
                    merged.insert(
                        key,
                        Contribution {
                            plugin: result.plugin.clone(),
                            value,
                        },
                    );
                }
            }
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn from<T>(plugin: &str, value: T) -> Contribution<T> {
        Contribution {
            plugin: plugin.into(),
            value,
        }
    }

    #[test]
    fn every_hook_has_a_distinct_name_that_parses_back() {
        for hook in Hook::ALL {
            assert_eq!(Hook::from_name(hook.name()), Some(hook));
            let json = serde_json::to_string(&hook).unwrap();
            assert_eq!(json, format!("\"{}\"", hook.name()));
        }
        let mut names: Vec<_> = Hook::ALL.iter().map(|h| h.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Hook::ALL.len());
    }

    #[test]
    fn the_wit_hook_enum_lists_the_hooks_in_declaration_order() {
        let wit = include_str!("../wit/axl-plugin.wit");
        let body = wit.split("enum hook {").nth(1).unwrap();
        let body = &body[..body.find('}').unwrap()];
        let names: Vec<String> = body
            .split(',')
            .map(|n| n.trim().replace('-', "_"))
            .filter(|n| !n.is_empty())
            .collect();
        let declared: Vec<&str> = Hook::DECLARED.iter().map(|h| h.name()).collect();
        assert_eq!(names, declared);
        for (i, hook) in Hook::DECLARED.into_iter().enumerate() {
            assert_eq!(hook.index() as usize, i);
            assert_eq!(Hook::from_index(i as u8), Some(hook));
        }
    }

    #[test]
    fn first_takes_the_earliest_answer_in_list_order() {
        let got = first([from("a", None), from("b", Some(2)), from("c", Some(3))]).unwrap();
        assert_eq!((got.plugin.as_str(), got.value), ("b", 2));
        assert_eq!(first::<i32>([from("a", None)]), None);
    }

    #[test]
    fn at_most_one_refuses_a_second_answer_and_names_both_plugins() {
        let one = at_most_one(Hook::LoadDatasets, [from("a", None), from("b", Some(1))]);
        assert_eq!(one.unwrap().unwrap().plugin, "b");
        let err = at_most_one(
            Hook::LoadDatasets,
            [from("a", Some(1)), from("b", None), from("c", Some(2))],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "plugins `a` and `c` both answer `load_datasets`, which takes one answer; remove one of them from `plugins:`"
        );
    }

    #[test]
    fn merge_keeps_agreeing_keys_and_refuses_conflicting_ones() {
        let map = |pairs: &[(&str, serde_json::Value)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        let merged = merge(
            Hook::PreModelLoad,
            [
                from(
                    "liger",
                    map(&[("rms_norm", json!("fused")), ("glu", json!("fused"))]),
                ),
                from(
                    "cce",
                    map(&[("cross_entropy", json!("cut")), ("glu", json!("fused"))]),
                ),
            ],
        )
        .unwrap();
        assert_eq!(merged.len(), 3);
        assert_eq!(merged["cross_entropy"].plugin, "cce");
        assert_eq!(merged["glu"].plugin, "liger");
        let err = merge(
            Hook::PreModelLoad,
            [
                from("liger", map(&[("cross_entropy", json!("fused_linear"))])),
                from("cce", map(&[("cross_entropy", json!("cut"))])),
            ],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "plugins `liger` and `cce` disagree on `cross_entropy` in `pre_model_load` (\"fused_linear\" vs \"cut\")"
        );
    }

    #[test]
    fn only_observational_hooks_let_a_run_survive_a_failure() {
        assert!(Hook::Configure.fatal());
        assert!(Hook::ComputeLoss.fatal());
        assert!(!Hook::OnStepEnd.fatal());
        assert!(!Hook::PostTrain.fatal());
        assert_eq!(Hook::CreateOptimizer.combine(), Combine::First);
        assert_eq!(Hook::OnGradients.combine(), Combine::All);
    }
}
