//! The `grokfast` plugin (`axolotl.integrations.grokfast.GrokfastPlugin`): before each
//! optimizer step it keeps an exponential moving average of every trainable parameter's
//! gradient and adds it, amplified, to the gradient (Grokfast's EMA filter):
//!
//! ```text
//! ĝ ← α·ĝ + (1 − α)·g      (ĝ starts as the first step's g)
//! g ← g + λ·ĝ
//! ```
//!
//! Keys, as Axolotl's `GrokfastArgs`: `grokfast_alpha` (α, default 0.98) and `grokfast_lamb`
//! (λ, default 2.0). The filter runs in the `on_gradients` hook, on the step's accumulated
//! gradients before clipping: `max_grad_norm` bounds the amplified gradient. (Axolotl filters
//! after the trainer has clipped, so there the update may exceed `max_grad_norm`.) The
//! averages live in memory: a resumed run starts them again from its first step.

use std::collections::BTreeMap;

use axl_sdk::prelude::*;

/// `grokfast_alpha` when unset.
pub const DEFAULT_ALPHA: f64 = 0.98;
/// `grokfast_lamb` when unset.
pub const DEFAULT_LAMB: f64 = 2.0;

/// The plugin: the filter's settings and the running average of each parameter's gradient.
pub struct GrokfastPlugin {
    alpha: f32,
    lamb: f32,
    averages: BTreeMap<String, Vec<f32>>,
}

impl Default for GrokfastPlugin {
    fn default() -> Self {
        Self {
            alpha: DEFAULT_ALPHA as f32,
            lamb: DEFAULT_LAMB as f32,
            averages: BTreeMap::new(),
        }
    }
}

fn schema() -> serde_json::Map<String, serde_json::Value> {
    let schema = json!({
        "grokfast_alpha": {
            "type": ["number", "null"], "minimum": 0.0, "exclusiveMaximum": 1.0,
            "default": DEFAULT_ALPHA,
            "description": "weight of the past in the gradients' moving average"
        },
        "grokfast_lamb": {
            "type": ["number", "null"], "minimum": 0.0, "default": DEFAULT_LAMB,
            "description": "how much of the moving average is added to each gradient"
        },
    });
    config_schema(schema)
}

impl GrokfastPlugin {
    /// A filter with `alpha` and `lamb`.
    pub fn new(alpha: f64, lamb: f64) -> Self {
        Self {
            alpha: alpha as f32,
            lamb: lamb as f32,
            averages: BTreeMap::new(),
        }
    }

    /// Applies the filter to one parameter's gradient.
    fn filter(&mut self, name: &str, grad: &mut [f32]) -> Result<(), PluginError> {
        let (alpha, lamb) = (self.alpha, self.lamb);
        let average = self
            .averages
            .entry(name.to_string())
            .or_insert_with(|| grad.to_vec());
        if average.len() != grad.len() {
            return Err(PluginError::new(format!(
                "the gradient of `{name}` changed size ({} to {} values)",
                average.len(),
                grad.len()
            )));
        }
        for (a, g) in average.iter_mut().zip(grad.iter_mut()) {
            *a = alpha * *a + (1.0 - alpha) * *g;
            *g += lamb * *a;
        }
        Ok(())
    }
}

impl Plugin for GrokfastPlugin {
    fn manifest(&self) -> Manifest {
        let mut manifest = manifest(
            "grokfast",
            env!("CARGO_PKG_VERSION"),
            &[Hook::Configure, Hook::OnGradients],
        );
        manifest.description =
            "Grokfast: amplifies the gradients' slow component before each optimizer step".into();
        manifest.config_schema = schema();
        manifest
    }

    fn configure(&mut self, run: &RunContext, host: &mut dyn Host) -> Result<(), PluginError> {
        let number = |key: &str, default: f64| {
            run.config
                .get(key)
                .and_then(|v| v.as_f64())
                .unwrap_or(default)
        };
        *self = Self::new(
            number("grokfast_alpha", DEFAULT_ALPHA),
            number("grokfast_lamb", DEFAULT_LAMB),
        );
        host.log(
            LogLevel::Info,
            &format!("gradient filter: alpha {}, lamb {}", self.alpha, self.lamb),
        );
        Ok(())
    }

    fn on_gradients(
        &mut self,
        gradients: &mut [Gradient<'_>],
        _host: &mut dyn Host,
    ) -> Result<(), PluginError> {
        for gradient in gradients.iter_mut() {
            self.filter(gradient.name, gradient.grad.data)?;
        }
        Ok(())
    }
}

axl_plugin_api::register_builtin!(
    GrokfastPlugin,
    "grokfast",
    aliases = [
        "axolotl.integrations.grokfast.GrokfastPlugin",
        "axolotl.integrations.grokfast"
    ]
);

#[cfg(test)]
mod tests {
    use super::*;
    use axl_sdk::testing::TestHost;

    fn step(plugin: &mut GrokfastPlugin, grad: &[f32]) -> Vec<f32> {
        let mut data = grad.to_vec();
        let shape = [data.len()];
        let mut gradients = [Gradient {
            name: "w",
            grad: TensorViewMut::new(&shape, &mut data).unwrap(),
        }];
        plugin
            .on_gradients(&mut gradients, &mut TestHost::default())
            .unwrap();
        data
    }

    #[test]
    fn the_filter_adds_the_amplified_moving_average() {
        let mut plugin = GrokfastPlugin::new(0.5, 2.0);
        // First step: the average is the gradient itself, so g becomes g + 2g.
        assert_eq!(step(&mut plugin, &[1.0, -2.0]), vec![3.0, -6.0]);
        // Second: average 0.5·[1, −2] + 0.5·[3, 0] = [2, −1]; g + 2·average.
        assert_eq!(step(&mut plugin, &[3.0, 0.0]), vec![7.0, -2.0]);
    }

    #[test]
    fn configure_reads_the_keys_with_axolotls_defaults() {
        let mut plugin = GrokfastPlugin::default();
        let run = RunContext {
            config: json!({"grokfast_lamb": 1.0}),
            ..RunContext::default()
        };
        let mut host = TestHost::default();
        plugin.configure(&run, &mut host).unwrap();
        assert_eq!((plugin.alpha, plugin.lamb), (0.98, 1.0));
        assert!(host.logs[0].1.contains("alpha 0.98, lamb 1"));
    }

    #[test]
    fn a_gradient_that_changes_size_is_an_error() {
        let mut plugin = GrokfastPlugin::default();
        step(&mut plugin, &[1.0]);
        let mut data = vec![1.0, 2.0];
        let shape = [2];
        let mut gradients = [Gradient {
            name: "w",
            grad: TensorViewMut::new(&shape, &mut data).unwrap(),
        }];
        let err = plugin
            .on_gradients(&mut gradients, &mut TestHost::default())
            .unwrap_err();
        assert!(err.message.contains("changed size"), "{err}");
    }
}
