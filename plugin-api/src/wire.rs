//! The JSON form of hook calls, shared by the transports that cross a boundary (native
//! libraries and WebAssembly components): [`serve`] runs a call on the plugin's side, and
//! [`Remote`] is the host's [`Plugin`] that sends each call through a [`Channel`].
//!
//! Every hook but `compute_loss` and `on_gradients` travels as a JSON request and a JSON
//! answer, both the serde form of the [`crate::payload`] types; the two tensor hooks have
//! their own entry points so tensors cross as memory, not text.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::hooks::Hook;
use crate::manifest::Manifest;
use crate::payload::{
    CommandCall, Control, DatasetEntry, Event, Formatted, KernelChoices, LossBatch, ModelInfo,
    OptimizerContext, OptimizerSpec, RewardBatch, Row, RunContext, ScheduleContext,
    TrainablePolicy,
};
use crate::plugin::{Host, Plugin, PluginError};
use crate::tensor::{Gradient, TensorView, TensorViewMut};

/// The request of `format_example`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FormatRequest {
    /// The dataset entry.
    pub dataset: DatasetEntry,
    /// The row.
    pub row: Row,
}

/// The request of `reward`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardRequest {
    /// The reward function.
    pub name: String,
    /// What to score.
    pub batch: RewardBatch,
}

fn decode<T: DeserializeOwned>(hook: Hook, what: &str, json: &str) -> Result<T, PluginError> {
    serde_json::from_str(json)
        .map_err(|e| PluginError::new(format!("malformed {what} of `{}`: {e}", hook.name())))
}

fn encode<T: Serialize>(value: &T) -> Result<String, PluginError> {
    serde_json::to_string(value).map_err(|e| PluginError::new(format!("cannot encode: {e}")))
}

/// Runs the JSON call `hook(payload)` on `plugin` and returns its JSON answer. The tensor
/// hooks are refused: they have their own entry points.
pub fn serve(
    plugin: &mut dyn Plugin,
    hook: Hook,
    payload: &str,
    host: &mut dyn Host,
) -> Result<String, PluginError> {
    match hook {
        Hook::Configure => {
            let run: RunContext = decode(hook, "request", payload)?;
            encode(&plugin.configure(&run, host)?)
        }
        Hook::LoadDatasets => {
            let run: RunContext = decode(hook, "request", payload)?;
            encode(&plugin.load_datasets(&run, host)?)
        }
        Hook::FormatExample => {
            let r: FormatRequest = decode(hook, "request", payload)?;
            encode(&plugin.format_example(&r.dataset, &r.row, host)?)
        }
        Hook::PreModelLoad => {
            let model: ModelInfo = decode(hook, "request", payload)?;
            encode(&plugin.pre_model_load(&model, host)?)
        }
        Hook::PostModelBuild | Hook::PreLoraLoad | Hook::PostLoraLoad => {
            let model: ModelInfo = decode(hook, "request", payload)?;
            encode(&plugin.model_event(hook, &model, host)?)
        }
        Hook::PostModelLoad => {
            let model: ModelInfo = decode(hook, "request", payload)?;
            encode(&plugin.post_model_load(&model, host)?)
        }
        Hook::CreateOptimizer => {
            let context: OptimizerContext = decode(hook, "request", payload)?;
            encode(&plugin.create_optimizer(&context, host)?)
        }
        Hook::LrSchedule => {
            let context: ScheduleContext = decode(hook, "request", payload)?;
            encode(&plugin.lr_schedule(&context, host)?)
        }
        Hook::OnTrainBegin
        | Hook::OnStepEnd
        | Hook::OnLog
        | Hook::OnEvaluate
        | Hook::OnSave
        | Hook::OnTrainEnd
        | Hook::PostTrain
        | Hook::OnError => {
            let event: Event = decode(hook, "request", payload)?;
            encode(&plugin.on_event(&event, host)?)
        }
        Hook::Reward => {
            let r: RewardRequest = decode(hook, "request", payload)?;
            encode(&plugin.reward(&r.name, &r.batch, host)?)
        }
        Hook::Commands => {
            let call: CommandCall = decode(hook, "request", payload)?;
            encode(&plugin.run_command(&call, host)?)
        }
        Hook::ComputeLoss | Hook::OnGradients => Err(PluginError::new(format!(
            "`{}` is not a JSON call",
            hook.name()
        ))),
    }
}

/// One plugin on the far side of a boundary, as the host reaches it.
pub trait Channel: Send {
    /// The manifest the plugin gave at load.
    fn manifest(&self) -> &Manifest;
    /// Sends the JSON call `hook(payload)` and returns the JSON answer.
    fn call(
        &mut self,
        hook: Hook,
        payload: &str,
        host: &mut dyn Host,
    ) -> Result<String, PluginError>;
    /// `compute_loss` (see [`Plugin::compute_loss`]).
    fn compute_loss(
        &mut self,
        logits: TensorView<'_>,
        grad: TensorViewMut<'_>,
        batch: &LossBatch,
        host: &mut dyn Host,
    ) -> Result<Option<f64>, PluginError>;
    /// `on_gradients` (see [`Plugin::on_gradients`]).
    fn on_gradients(
        &mut self,
        gradients: &mut [Gradient<'_>],
        host: &mut dyn Host,
    ) -> Result<(), PluginError>;
}

/// The host's [`Plugin`] for a plugin behind a [`Channel`].
pub struct Remote<C>(pub C);

impl<C: Channel> Remote<C> {
    fn ask<Q: Serialize, A: DeserializeOwned>(
        &mut self,
        hook: Hook,
        request: &Q,
        host: &mut dyn Host,
    ) -> Result<A, PluginError> {
        let answer = self.0.call(hook, &encode(request)?, host)?;
        decode(hook, "answer", &answer)
    }
}

impl<C: Channel> Plugin for Remote<C> {
    fn manifest(&self) -> Manifest {
        self.0.manifest().clone()
    }

    fn configure(&mut self, run: &RunContext, host: &mut dyn Host) -> Result<(), PluginError> {
        self.ask(Hook::Configure, run, host)
    }

    fn load_datasets(
        &mut self,
        run: &RunContext,
        host: &mut dyn Host,
    ) -> Result<Option<Vec<Row>>, PluginError> {
        self.ask(Hook::LoadDatasets, run, host)
    }

    fn format_example(
        &mut self,
        dataset: &DatasetEntry,
        row: &Row,
        host: &mut dyn Host,
    ) -> Result<Formatted, PluginError> {
        let request = FormatRequest {
            dataset: dataset.clone(),
            row: row.clone(),
        };
        self.ask(Hook::FormatExample, &request, host)
    }

    fn pre_model_load(
        &mut self,
        model: &ModelInfo,
        host: &mut dyn Host,
    ) -> Result<KernelChoices, PluginError> {
        self.ask(Hook::PreModelLoad, model, host)
    }

    fn model_event(
        &mut self,
        hook: Hook,
        model: &ModelInfo,
        host: &mut dyn Host,
    ) -> Result<(), PluginError> {
        self.ask(hook, model, host)
    }

    fn post_model_load(
        &mut self,
        model: &ModelInfo,
        host: &mut dyn Host,
    ) -> Result<TrainablePolicy, PluginError> {
        self.ask(Hook::PostModelLoad, model, host)
    }

    fn create_optimizer(
        &mut self,
        context: &OptimizerContext,
        host: &mut dyn Host,
    ) -> Result<Option<OptimizerSpec>, PluginError> {
        self.ask(Hook::CreateOptimizer, context, host)
    }

    fn lr_schedule(
        &mut self,
        context: &ScheduleContext,
        host: &mut dyn Host,
    ) -> Result<Option<f64>, PluginError> {
        self.ask(Hook::LrSchedule, context, host)
    }

    fn compute_loss(
        &mut self,
        logits: TensorView<'_>,
        grad: TensorViewMut<'_>,
        batch: &LossBatch,
        host: &mut dyn Host,
    ) -> Result<Option<f64>, PluginError> {
        self.0.compute_loss(logits, grad, batch, host)
    }

    fn on_gradients(
        &mut self,
        gradients: &mut [Gradient<'_>],
        host: &mut dyn Host,
    ) -> Result<(), PluginError> {
        self.0.on_gradients(gradients, host)
    }

    fn on_event(&mut self, event: &Event, host: &mut dyn Host) -> Result<Control, PluginError> {
        self.ask(event.hook, event, host)
    }

    fn reward(
        &mut self,
        name: &str,
        batch: &RewardBatch,
        host: &mut dyn Host,
    ) -> Result<Vec<Option<f64>>, PluginError> {
        let request = RewardRequest {
            name: name.to_string(),
            batch: batch.clone(),
        };
        self.ask(Hook::Reward, &request, host)
    }

    fn run_command(&mut self, call: &CommandCall, host: &mut dyn Host) -> Result<(), PluginError> {
        self.ask(Hook::Commands, call, host)
    }
}

/// A host-service call as it crosses a boundary (see [`Host`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "service", rename_all = "snake_case")]
pub enum HostCall {
    /// [`Host::log`].
    Log {
        /// The level.
        level: crate::payload::LogLevel,
        /// The line.
        message: String,
    },
    /// [`Host::metric`].
    Metric {
        /// The metric's name.
        name: String,
        /// Its value.
        value: f64,
    },
    /// [`Host::tokenize`].
    Tokenize {
        /// The text.
        text: String,
    },
    /// [`Host::encode`].
    Encode {
        /// The text.
        text: String,
        /// With the tokenizer's special tokens.
        add_special_tokens: bool,
    },
    /// [`Host::detokenize`].
    Detokenize {
        /// The ids.
        ids: Vec<u32>,
    },
    /// [`Host::score`].
    Score {
        /// The questions.
        requests: Vec<crate::payload::ScoreRequest>,
    },
    /// [`Host::generate`].
    Generate {
        /// What to generate.
        request: crate::payload::GenerateRequest,
    },
    /// [`Host::http`].
    Http {
        /// The request.
        request: crate::payload::HttpRequest,
    },
    /// [`Host::apply_chat_template`].
    ApplyChatTemplate {
        /// `(role, content)` turns.
        messages: Vec<(String, String)>,
        /// End with the assistant's prompt.
        add_generation_prompt: bool,
    },
    /// [`Host::use_model`].
    UseModel {
        /// The model.
        model: String,
    },
}

/// Runs a JSON [`HostCall`] against `host` and returns the JSON answer.
pub fn serve_host(host: &mut dyn Host, call: &str) -> Result<String, PluginError> {
    let call: HostCall = serde_json::from_str(call)
        .map_err(|e| PluginError::new(format!("malformed host call: {e}")))?;
    match call {
        HostCall::Log { level, message } => encode(&host.log(level, &message)),
        HostCall::Metric { name, value } => encode(&host.metric(&name, value)),
        HostCall::Tokenize { text } => encode(&host.tokenize(&text)?),
        HostCall::Detokenize { ids } => encode(&host.detokenize(&ids)?),
        HostCall::Encode {
            text,
            add_special_tokens,
        } => encode(&host.encode(&text, add_special_tokens)?),
        HostCall::Score { requests } => encode(&host.score(&requests)?),
        HostCall::Generate { request } => encode(&host.generate(&request)?),
        HostCall::UseModel { model } => encode(&host.use_model(&model)?),
        HostCall::Http { request } => encode(&host.http(&request)?),
        HostCall::ApplyChatTemplate {
            messages,
            add_generation_prompt,
        } => encode(&host.apply_chat_template(&messages, add_generation_prompt)?),
    }
}

/// How a plugin on the far side of a boundary reaches its host.
pub trait HostChannel {
    /// Sends a JSON [`HostCall`] and returns the JSON answer.
    fn call(&mut self, call: &str) -> Result<String, PluginError>;
    /// [`Host::parameter`].
    fn parameter(&mut self, name: &str) -> Result<TensorView<'_>, PluginError>;
}

/// The plugin side's [`Host`] over a [`HostChannel`].
pub struct RemoteHost<C>(pub C);

impl<C: HostChannel> RemoteHost<C> {
    fn ask<A: DeserializeOwned>(&mut self, call: &HostCall) -> Result<A, PluginError> {
        let answer = self.0.call(&encode(call)?)?;
        serde_json::from_str(&answer)
            .map_err(|e| PluginError::new(format!("malformed host answer: {e}")))
    }
}

impl<C: HostChannel> Host for RemoteHost<C> {
    fn log(&mut self, level: crate::payload::LogLevel, message: &str) {
        let call = HostCall::Log {
            level,
            message: message.to_string(),
        };
        let _: Result<(), _> = self.ask(&call);
    }

    fn metric(&mut self, name: &str, value: f64) {
        let call = HostCall::Metric {
            name: name.to_string(),
            value,
        };
        let _: Result<(), _> = self.ask(&call);
    }

    fn tokenize(&mut self, text: &str) -> Result<Vec<u32>, PluginError> {
        self.ask(&HostCall::Tokenize {
            text: text.to_string(),
        })
    }

    fn detokenize(&mut self, ids: &[u32]) -> Result<String, PluginError> {
        self.ask(&HostCall::Detokenize { ids: ids.to_vec() })
    }

    fn encode(&mut self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, PluginError> {
        self.ask(&HostCall::Encode {
            text: text.to_string(),
            add_special_tokens,
        })
    }

    fn parameter(&mut self, name: &str) -> Result<TensorView<'_>, PluginError> {
        self.0.parameter(name)
    }

    fn score(
        &mut self,
        requests: &[crate::payload::ScoreRequest],
    ) -> Result<Vec<crate::payload::Score>, PluginError> {
        self.ask(&HostCall::Score {
            requests: requests.to_vec(),
        })
    }

    fn generate(
        &mut self,
        request: &crate::payload::GenerateRequest,
    ) -> Result<String, PluginError> {
        self.ask(&HostCall::Generate {
            request: request.clone(),
        })
    }

    fn apply_chat_template(
        &mut self,
        messages: &[(String, String)],
        add_generation_prompt: bool,
    ) -> Result<String, PluginError> {
        self.ask(&HostCall::ApplyChatTemplate {
            messages: messages.to_vec(),
            add_generation_prompt,
        })
    }

    fn http(
        &mut self,
        request: &crate::payload::HttpRequest,
    ) -> Result<crate::payload::HttpResponse, PluginError> {
        self.ask(&HostCall::Http {
            request: request.clone(),
        })
    }

    fn use_model(&mut self, model: &str) -> Result<(), PluginError> {
        self.ask(&HostCall::UseModel {
            model: model.to_string(),
        })
    }
}
