//! The host services plugins call back into: logging, metrics, the tokenizer, and, where a
//! model is loaded, its parameters, log-likelihoods and generation.

use axl_plugin_api::payload::{
    GenerateRequest, HttpRequest, HttpResponse, LogLevel, Score, ScoreRequest,
};
use axl_plugin_api::{Host, PluginError, TensorView};

use crate::model::tokenizer::ModelTokenizer;

/// What a loaded model offers plugins.
pub trait ModelServices {
    /// A parameter's shape and values, as `f32`.
    fn parameter(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), String>;
    /// Log-likelihoods of continuations.
    fn score(&self, requests: &[ScoreRequest]) -> Result<Vec<Score>, String>;
    /// Generated text.
    fn generate(&self, request: &GenerateRequest) -> Result<String, String>;
    /// The model's tokenizer, where the services hold one of their own.
    fn tokenizer(&self) -> Result<&ModelTokenizer, String> {
        Err("no tokenizer is loaded yet at this hook".into())
    }
    /// Switches to another model (a directory or Hub id), where the services allow it.
    fn choose(&self, model: &str) -> Result<(), String> {
        Err(format!(
            "cannot switch to the model `{model}` here: only a plugin's own command chooses its model"
        ))
    }
}

/// The services of the moment: what is loaded, and the metrics plugins report.
#[derive(Default)]
pub struct Services<'a> {
    /// The tokenizer, once loaded.
    pub tokenizer: Option<&'a ModelTokenizer>,
    /// The model, once loaded.
    pub model: Option<&'a dyn ModelServices>,
    /// Metrics reported since they were last taken, with their plugin.
    pub metrics: Vec<(String, f64)>,
    shape: Vec<usize>,
    values: Vec<f32>,
}

impl<'a> Services<'a> {
    /// Services with a tokenizer.
    pub fn with_tokenizer(tokenizer: &'a ModelTokenizer) -> Self {
        Self {
            tokenizer: Some(tokenizer),
            ..Self::default()
        }
    }

    /// The services as the plugin `name` sees them; `net` is what its sandbox lets it reach
    /// over HTTP (`None`: trusted code, anything).
    pub fn for_plugin<'s>(
        &'s mut self,
        name: &'s str,
        net: Option<&'s [String]>,
    ) -> PluginHost<'s, 'a> {
        PluginHost {
            plugin: name,
            net,
            services: self,
        }
    }
}

/// [`Services`] as one plugin reaches them: its log lines carry its name, and its HTTP
/// requests are held to its sandbox's grants.
pub struct PluginHost<'s, 'a> {
    plugin: &'s str,
    net: Option<&'s [String]>,
    services: &'s mut Services<'a>,
}

impl PluginHost<'_, '_> {
    fn tokenizer(&self) -> Result<&ModelTokenizer, PluginError> {
        if let Some(tokenizer) = self.services.tokenizer {
            return Ok(tokenizer);
        }
        match self.services.model {
            Some(model) => model.tokenizer().map_err(PluginError::new),
            None => Err(PluginError::new("no tokenizer is loaded yet at this hook")),
        }
    }

    fn model(&self) -> Result<&dyn ModelServices, PluginError> {
        self.services
            .model
            .ok_or_else(|| PluginError::new("no model is loaded at this hook"))
    }
}

impl Host for PluginHost<'_, '_> {
    fn log(&mut self, level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Debug => {
                if std::env::var_os("AXL_DEBUG").is_none() {
                    return;
                }
                "debug"
            }
            LogLevel::Info => "info",
            LogLevel::Warn => "warning",
            LogLevel::Error => "error",
        };
        eprintln!("[{}] {level}: {message}", self.plugin);
    }

    fn metric(&mut self, name: &str, value: f64) {
        self.services.metrics.push((name.to_string(), value));
    }

    fn tokenize(&mut self, text: &str) -> Result<Vec<u32>, PluginError> {
        self.tokenizer()?
            .encode(text, false)
            .map_err(|e| PluginError::new(e.to_string()))
    }

    fn detokenize(&mut self, ids: &[u32]) -> Result<String, PluginError> {
        self.tokenizer()?
            .decode(ids, false)
            .map_err(|e| PluginError::new(e.to_string()))
    }

    fn encode(&mut self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, PluginError> {
        self.tokenizer()?
            .encode(text, add_special_tokens)
            .map_err(|e| PluginError::new(e.to_string()))
    }

    fn parameter(&mut self, name: &str) -> Result<TensorView<'_>, PluginError> {
        let (shape, values) = self.model()?.parameter(name).map_err(PluginError::new)?;
        self.services.shape = shape;
        self.services.values = values;
        Ok(TensorView {
            shape: &self.services.shape,
            data: &self.services.values,
        })
    }

    fn score(&mut self, requests: &[ScoreRequest]) -> Result<Vec<Score>, PluginError> {
        self.model()?.score(requests).map_err(PluginError::new)
    }

    fn generate(&mut self, request: &GenerateRequest) -> Result<String, PluginError> {
        self.model()?.generate(request).map_err(PluginError::new)
    }

    fn use_model(&mut self, model: &str) -> Result<(), PluginError> {
        self.model()?.choose(model).map_err(PluginError::new)
    }

    fn http(&mut self, request: &HttpRequest) -> Result<HttpResponse, PluginError> {
        if let Some(grants) = self.net {
            super::http::granted(&request.url, grants).map_err(PluginError::new)?;
        }
        super::http::send(request).map_err(PluginError::new)
    }

    fn apply_chat_template(
        &mut self,
        messages: &[(String, String)],
        add_generation_prompt: bool,
    ) -> Result<String, PluginError> {
        use crate::chat_template::{ChatTemplate, Message, SpecialTokens};
        let tokenizer = self.tokenizer()?;
        let source = tokenizer.chat_template.as_deref().ok_or_else(|| {
            PluginError::new(format!("{} has no chat template", tokenizer.dir.display()))
        })?;
        let special = SpecialTokens {
            bos_token: tokenizer.bos.as_ref().map(|t| t.0.clone()),
            eos_token: tokenizer.eos.as_ref().map(|t| t.0.clone()),
            pad_token: tokenizer.pad.as_ref().map(|t| t.0.clone()),
            unk_token: None,
        };
        let messages: Vec<Message> = messages.iter().map(|(r, c)| Message::new(r, c)).collect();
        ChatTemplate::new(source)
            .and_then(|t| t.render(&messages, add_generation_prompt, &special))
            .map_err(|e| PluginError::new(format!("the chat template: {e}")))
    }
}

/// A loaded model and its tokenizer, as plugins reach them.
pub struct LoadedModel<'a> {
    /// The model.
    pub model: &'a crate::model::CausalLm,
    /// Its tokenizer.
    pub tokenizer: &'a ModelTokenizer,
}

impl LoadedModel<'_> {
    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text, special)
            .map_err(|e| e.to_string())
    }
}

impl ModelServices for LoadedModel<'_> {
    fn tokenizer(&self) -> Result<&ModelTokenizer, String> {
        Ok(self.tokenizer)
    }

    fn parameter(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), String> {
        let mut found = None;
        self.model.visit_params(&mut |n, p| {
            if n == name {
                found = Some(p.tensor().clone());
            }
        });
        let tensor = found.ok_or_else(|| format!("the model has no parameter `{name}`"))?;
        let values = tensor
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| e.to_string())?;
        Ok((tensor.dims().to_vec(), values))
    }

    fn score(&self, requests: &[ScoreRequest]) -> Result<Vec<Score>, String> {
        requests
            .iter()
            .map(|request| {
                let (context, continuation) =
                    match (&request.context_ids, &request.continuation_ids) {
                        (Some(context), Some(continuation)) => {
                            (context.clone(), continuation.clone())
                        }
                        _ => (
                            self.encode(&request.context, true)?,
                            self.encode(&request.continuation, false)?,
                        ),
                    };
                if continuation.is_empty() {
                    return Ok(Score {
                        log_likelihood: 0.0,
                        greedy: true,
                    });
                }
                let ids: Vec<u32> = context.iter().chain(&continuation).copied().collect();
                if context.is_empty() {
                    return Err("the context is empty: nothing predicts the first token".into());
                }
                continuation_score(self.model, &ids, context.len()).map_err(|e| e.to_string())
            })
            .collect()
    }

    fn generate(&self, request: &GenerateRequest) -> Result<String, String> {
        use crate::model::generate::{Decoder, SamplingParams};
        let prompt = match &request.prompt_ids {
            Some(ids) => ids.clone(),
            None => self.encode(&request.prompt, true)?,
        };
        let params = SamplingParams {
            max_new_tokens: request.max_new_tokens,
            do_sample: request.temperature > 0.0,
            temperature: if request.temperature > 0.0 {
                request.temperature
            } else {
                1.0
            },
            ..SamplingParams::default()
        };
        let stop_ids = self.tokenizer.stop_ids(&self.model.config.eos_token_ids);
        let mut decoder = Decoder::new(self.model, params.seed);
        // Stops as soon as the text holds a stop string.
        let mut new_ids = Vec::new();
        let mut on_token = |id: u32| {
            if request.stop.is_empty() {
                return true;
            }
            new_ids.push(id);
            self.tokenizer.decode(&new_ids, true).map_or(true, |t| {
                !request.stop.iter().any(|s| t.contains(s.as_str()))
            })
        };
        let (ids, _) = decoder
            .generate(&prompt, &params, &stop_ids, &mut on_token)
            .map_err(|e| e.to_string())?;
        let mut text = self
            .tokenizer
            .decode(&ids, true)
            .map_err(|e| e.to_string())?;
        if let Some(cut) = request
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(cut);
        }
        Ok(text)
    }
}

/// The log-likelihood of `ids[start..]` after `ids[..start]`, and whether each of those tokens
/// was the most likely one.
fn continuation_score(
    model: &crate::model::CausalLm,
    ids: &[u32],
    start: usize,
) -> crate::model::Result<Score> {
    let input = candle_core::Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let logits = model
        .forward(&input, None)?
        .to_dtype(candle_core::DType::F32)?
        .squeeze(0)?
        .narrow(0, start - 1, ids.len() - start)?
        .to_vec2::<f32>()?;
    let mut score = Score {
        log_likelihood: 0.0,
        greedy: true,
    };
    for (row, &target) in logits.iter().zip(&ids[start..]) {
        if target as usize >= row.len() {
            return Err(crate::model::ModelError::Invalid(format!(
                "token id {target} is outside the model's vocabulary of {}",
                row.len()
            )));
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = row
            .iter()
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln()
            + max as f64;
        score.log_likelihood += row[target as usize] as f64 - log_sum;
        score.greedy &= row[target as usize] >= max;
    }
    Ok(score)
}
