//! LoRA adapters in PEFT's format: attaching fresh adapters by Axolotl's keys, loading and
//! saving `adapter_config.json` + `adapter_model.safetensors` with PEFT's tensor names, and
//! merging adapters into the base weights.
//!
//! Base weights stay frozen tensors shared with the base model: attaching an adapter never
//! copies them. Modules listed in `modules_to_save` get a full trainable copy, as in PEFT.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::error::{ModelError, Result};
use super::layers::{LoraAdapter, Param};
use super::safetensors_io::{self, SaveDtype};
use super::transformer::CausalLm;
use crate::fsio;

/// File name of a PEFT adapter's configuration.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// File name of a PEFT adapter's weights.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const PEFT_PREFIX: &str = "base_model.model.";

/// Which modules get adapters.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    /// Every linear layer but the output head (`lora_target_linear: true`, PEFT's `all-linear`).
    AllLinear,
    /// Modules whose path ends with one of these names (PEFT's list form).
    Names(Vec<String>),
    /// Modules whose full path matches this regular expression (PEFT's string form).
    Regex(String),
}

/// A LoRA configuration, in Axolotl's and PEFT's terms.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSettings {
    /// Rank (`lora_r`).
    pub r: usize,
    /// Scaling numerator (`lora_alpha`).
    pub alpha: f64,
    /// Dropout on the adapter input while training (`lora_dropout`).
    pub dropout: f32,
    /// Which modules are adapted.
    pub target: TargetModules,
    /// Modules trained and saved in full (`lora_modules_to_save`), e.g. `embed_tokens`, `lm_head`.
    pub modules_to_save: Vec<String>,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r` (`peft_use_rslora`).
    pub use_rslora: bool,
    /// Only adapt these layer indices (`peft_layers_to_transform`).
    pub layers_to_transform: Option<Vec<usize>>,
}

impl LoraSettings {
    /// The factor applied to `B·A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

fn layer_index(path: &str) -> Option<usize> {
    let rest = path.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

fn module_name(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

fn matches_target(target: &TargetModules, regex: Option<&regex::Regex>, path: &str) -> bool {
    match target {
        TargetModules::AllLinear => path != "lm_head",
        TargetModules::Names(names) => names
            .iter()
            .any(|n| path == n || path.ends_with(&format!(".{n}"))),
        TargetModules::Regex(_) => regex.is_some_and(|r| r.is_match(path)),
    }
}

fn compile_target(target: &TargetModules) -> Result<Option<regex::Regex>> {
    match target {
        TargetModules::Regex(pattern) => regex::Regex::new(&format!("^(?:{pattern})$"))
            .map(Some)
            .map_err(|e| {
                ModelError::Invalid(format!(
                    "lora_target_modules: invalid regular expression: {e}"
                ))
            }),
        _ => Ok(None),
    }
}

/// Attaches fresh adapters (A: PEFT's Kaiming-uniform init, B: zeros) and trainable copies of
/// `modules_to_save`; every other weight is frozen. Returns the adapted module paths.
pub fn attach_new(model: &mut CausalLm, settings: &LoraSettings, seed: u64) -> Result<Vec<String>> {
    if settings.r == 0 {
        return Err(ModelError::Invalid("lora_r must be at least 1".into()));
    }
    freeze_all(model);
    let regex = compile_target(&settings.target)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut adapted = Vec::new();
    let device = model.device().clone();
    for linear in model.linears_mut() {
        let in_layer = match (&settings.layers_to_transform, layer_index(&linear.path)) {
            (Some(layers), Some(i)) => layers.contains(&i),
            (Some(_), None) => false,
            (None, _) => true,
        };
        if !in_layer || !matches_target(&settings.target, regex.as_ref(), &linear.path) {
            continue;
        }
        let (out, inp) = (linear.out_features(), linear.in_features());
        let bound = 1.0 / (inp as f32).sqrt();
        let a: Vec<f32> = (0..settings.r * inp)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Tensor::from_vec(a, (settings.r, inp), &device)?;
        let b = Tensor::zeros((out, settings.r), DType::F32, &device)?;
        linear.lora = Some(LoraAdapter {
            a: Param::Trainable(Var::from_tensor(&a)?),
            b: Param::Trainable(Var::from_tensor(&b)?),
            scale: settings.scale(),
            dropout: settings.dropout,
        });
        adapted.push(linear.path.clone());
    }
    if adapted.is_empty() {
        return Err(ModelError::Invalid(format!(
            "no module matches the LoRA targets {:?}{}",
            settings.target,
            settings
                .layers_to_transform
                .as_ref()
                .map(|l| format!(" in layers {l:?}"))
                .unwrap_or_default()
        )));
    }
    if let TargetModules::Names(names) = &settings.target {
        let found: BTreeSet<&str> = adapted.iter().map(|p| module_name(p)).collect();
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| !found.contains(n.as_str()))
            .collect();
        if !missing.is_empty() {
            return Err(ModelError::Invalid(format!(
                "lora_target_modules: {missing:?} not found in the model (linear modules: {})",
                linear_module_names(model).join(", ")
            )));
        }
    }
    save_modules(model, &settings.modules_to_save)?;
    Ok(adapted)
}

fn linear_module_names(model: &CausalLm) -> Vec<String> {
    let set: BTreeSet<String> = model
        .linears()
        .iter()
        .map(|l| module_name(&l.path).to_string())
        .collect();
    set.into_iter().collect()
}

/// Makes every base weight frozen.
pub fn freeze_all(model: &mut CausalLm) {
    model.map_params(&mut |_, p| p.to_frozen());
}

fn save_modules(model: &mut CausalLm, names: &[String]) -> Result<()> {
    for name in names {
        let mut found = false;
        if name == "embed_tokens" || name == "model.embed_tokens" {
            model.embed_tokens.weight = model.embed_tokens.weight.to_trainable()?;
            model.embed_tokens.saved_with_adapter = true;
            found = true;
        }
        for linear in model.linears_mut() {
            if linear.path == *name || linear.path.ends_with(&format!(".{name}")) {
                linear.weight = linear.weight.to_trainable()?;
                if let Some(b) = &linear.bias {
                    linear.bias = Some(b.to_trainable()?);
                }
                linear.saved_with_adapter = true;
                found = true;
            }
        }
        if !found {
            return Err(ModelError::Invalid(format!(
                "lora_modules_to_save: `{name}` is not a module of this model (embed_tokens, lm_head, or a linear module)"
            )));
        }
    }
    Ok(())
}

/// Loads a PEFT LoRA adapter directory onto the model. Trainable adapters continue training;
/// frozen ones are for inference and merging.
pub fn load_adapter(model: &mut CausalLm, dir: &Path, trainable: bool) -> Result<LoraSettings> {
    let config_path = dir.join(ADAPTER_CONFIG);
    let settings = read_adapter_config(&config_path)?;
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    if !weights_path.is_file() {
        let hint = if dir.join("adapter_model.bin").is_file() {
            " (adapter_model.bin is a pickle; save the adapter with safetensors)"
        } else {
            ""
        };
        return Err(ModelError::file(&weights_path, format!("missing{hint}")));
    }
    let mut tensors = safetensors_io::load_file(&weights_path, DType::F32, model.device())?;
    freeze_all(model);
    let wrap = |t: Tensor| -> Result<Param> {
        Ok(if trainable {
            Param::Trainable(Var::from_tensor(&t)?)
        } else {
            Param::Frozen(t)
        })
    };
    let scale = settings.scale();
    for linear in model.linears_mut() {
        let a_name = format!("{PEFT_PREFIX}{}.lora_A.weight", linear.path);
        let b_name = format!("{PEFT_PREFIX}{}.lora_B.weight", linear.path);
        if let Some(a) = tensors.get(&a_name) {
            let r = a.dim(0)?;
            if r != settings.r {
                return Err(ModelError::tensor(
                    &weights_path,
                    &a_name,
                    format!("has rank {r} but {ADAPTER_CONFIG} says r = {}", settings.r),
                ));
            }
            let a = tensors.take(&a_name, &[r, linear.in_features()])?;
            let b = tensors.take(&b_name, &[linear.out_features(), r])?;
            linear.lora = Some(LoraAdapter {
                a: wrap(a)?,
                b: wrap(b)?,
                scale,
                dropout: settings.dropout,
            });
        }
    }
    let embed_name = format!("{PEFT_PREFIX}model.embed_tokens.weight");
    if let Some(t) = tensors.take_opt(&embed_name, model.embed_tokens.weight.tensor().dims())? {
        model.embed_tokens.weight = wrap(t)?;
        model.embed_tokens.saved_with_adapter = true;
    }
    for linear in model.linears_mut() {
        let w_name = format!("{PEFT_PREFIX}{}.weight", linear.path);
        if let Some(t) =
            tensors.take_opt(&w_name, &[linear.out_features(), linear.in_features()])?
        {
            linear.weight = wrap(t)?;
            linear.saved_with_adapter = true;
            let b_name = format!("{PEFT_PREFIX}{}.bias", linear.path);
            if let Some(b) = tensors.take_opt(&b_name, &[linear.out_features()])? {
                linear.bias = Some(wrap(b)?);
            }
        }
    }
    let leftover = tensors.drain();
    if let Some((name, _, file)) = leftover.first() {
        return Err(ModelError::tensor(
            file,
            name,
            format!(
                "does not belong to any module of this {} model",
                model.config.architecture.model_type()
            ),
        ));
    }
    Ok(settings)
}

/// Reads a PEFT `adapter_config.json`, refusing adapter kinds axl does not implement.
pub fn read_adapter_config(path: &Path) -> Result<LoraSettings> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::file(path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::file(path, format!("invalid JSON: {e}")))?;
    let key_err = |k: &str, m: &str| ModelError::key(path, k, m);
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(key_err(
            "peft_type",
            &format!("`{peft_type}` adapters are not supported (LORA only)"),
        ));
    }
    if v.get("use_dora").and_then(Value::as_bool).unwrap_or(false) {
        return Err(key_err("use_dora", "DoRA adapters are not supported"));
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if v.get(k)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(key_err(k, "per-module ranks or alphas are not supported"));
        }
    }
    if v.get("fan_in_fan_out")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        return Err(key_err(
            "fan_in_fan_out",
            "adapters for Conv1D (fan_in_fan_out) layers are not supported",
        ));
    }
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| key_err("r", "missing or not an integer"))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| key_err("lora_alpha", "missing or not a number"))?;
    let target = match v.get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => TargetModules::AllLinear,
        Some(Value::String(s)) => TargetModules::Regex(s.clone()),
        Some(Value::Array(a)) => TargetModules::Names(
            a.iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| key_err("target_modules", "expected a list of strings"))?,
        ),
        _ => return Err(key_err("target_modules", "missing")),
    };
    let layers_to_transform = match v.get("layers_to_transform") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(vec![n.as_u64().unwrap_or(0) as usize]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| x.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    key_err("layers_to_transform", "expected a list of layer indices")
                })?,
        ),
        Some(_) => {
            return Err(key_err(
                "layers_to_transform",
                "expected a list of layer indices",
            ))
        }
    };
    let modules_to_save = match v.get("modules_to_save") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        _ => vec![],
    };
    Ok(LoraSettings {
        r,
        alpha,
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
        target,
        modules_to_save,
        use_rslora: v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        layers_to_transform,
    })
}

/// The adapter's tensors under PEFT's names (`base_model.model.….lora_A.weight`, and the full
/// weights of `modules_to_save`).
pub fn adapter_tensors(model: &CausalLm) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    let mut push =
        |name: String, p: &Param| out.push((format!("{PEFT_PREFIX}{name}"), p.tensor().detach()));
    if model.embed_tokens.saved_with_adapter {
        push(
            format!("{}.weight", model.embed_tokens.path),
            &model.embed_tokens.weight,
        );
    }
    let mut linears = model.linears();
    if model.config.tie_word_embeddings {
        linears.push(&model.lm_head);
    }
    for linear in linears {
        if let Some(l) = &linear.lora {
            push(format!("{}.lora_A.weight", linear.path), &l.a);
            push(format!("{}.lora_B.weight", linear.path), &l.b);
        }
        if linear.saved_with_adapter {
            push(format!("{}.weight", linear.path), &linear.weight);
            if let Some(b) = &linear.bias {
                push(format!("{}.bias", linear.path), b);
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Writes the adapter as PEFT does: `adapter_config.json` and `adapter_model.safetensors`
/// (atomically each). `base_model` is recorded as `base_model_name_or_path`.
pub fn save_adapter(
    model: &CausalLm,
    settings: &LoraSettings,
    dir: &Path,
    base_model: &str,
) -> Result<Vec<PathBuf>> {
    let tensors = adapter_tensors(model);
    if tensors.is_empty() {
        return Err(ModelError::Invalid(
            "the model has no adapter to save".into(),
        ));
    }
    let mut targets: BTreeSet<String> = BTreeSet::new();
    let mut linears = model.linears();
    linears.push(&model.lm_head);
    for linear in linears {
        if linear.lora.is_some() {
            targets.insert(module_name(&linear.path).to_string());
        }
    }
    let target_modules = match &settings.target {
        TargetModules::Regex(r) => json!(r),
        _ => json!(targets.into_iter().collect::<Vec<_>>()),
    };
    let config = json!({
        "alpha_pattern": {},
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": settings.layers_to_transform,
        "lora_alpha": if settings.alpha.fract() == 0.0 { json!(settings.alpha as i64) } else { json!(settings.alpha) },
        "lora_dropout": settings.dropout,
        "modules_to_save": if settings.modules_to_save.is_empty() { Value::Null } else { json!(settings.modules_to_save) },
        "peft_type": "LORA",
        "r": settings.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": target_modules,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": settings.use_rslora,
    });
    std::fs::create_dir_all(dir).map_err(|e| ModelError::file(dir, e))?;
    let weights = dir.join(ADAPTER_WEIGHTS);
    safetensors_io::save_file(&weights, &tensors, SaveDtype::F32)?;
    let config_path = dir.join(ADAPTER_CONFIG);
    fsio::write_json_atomic(&config_path, &config)
        .map_err(|e| ModelError::file(&config_path, e))?;
    Ok(vec![weights, config_path])
}

/// Folds every adapter into its base weight (`W + scale·B·A`) and makes saved module copies
/// the module weights, leaving a plain model with frozen weights.
pub fn merge(model: &mut CausalLm) -> Result<usize> {
    let mut merged = 0;
    if model.config.tie_word_embeddings
        && (model.embed_tokens.saved_with_adapter
            || model.lm_head.saved_with_adapter
            || model.lm_head.lora.is_some())
    {
        // Head and embedding no longer agree once either is changed on its own.
        model.untie_lm_head();
    }
    for linear in model.linears_mut() {
        if linear.lora.is_some() {
            linear.weight = Param::Frozen(linear.merged_weight()?);
            linear.lora = None;
            merged += 1;
        }
        linear.saved_with_adapter = false;
    }
    model.embed_tokens.saved_with_adapter = false;
    freeze_all(model);
    Ok(merged)
}

/// Counts of trainable and total parameters (tied weights counted once).
pub fn parameter_counts(model: &CausalLm) -> (usize, usize) {
    let mut trainable = 0;
    let mut total = 0;
    model.visit_params(&mut |_, p| {
        let n = p.tensor().elem_count();
        total += n;
        if p.var().is_some() {
            trainable += n;
        }
    });
    (trainable, total)
}
