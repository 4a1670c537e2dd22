//! The decoder-only transformer shared by every supported architecture: token embedding,
//! decoder layers (attention with GQA, rotary embeddings, optional sliding window, soft-capping
//! and q/k norms; gated MLP), final norm and LM head, with a KV cache for generation.

use std::path::Path;

use std::sync::Arc;

use axl_kernels::attention::{causal_attention, causal_attention_with_rope, CausalMask, Scores};
use axl_kernels::glu::{gated, GateActivation};
use axl_kernels::rope::rope;
use axl_kernels::Precision;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

use super::error::{ModelError, Result};
use super::hf_config::{Activation, LayerAttention, ModelConfig};
use super::kernels::{Implementation, KernelSelection, LossKernel};
use super::layers::{DropoutRng, Embedding, Linear, Param, ParamVisitor, RmsNorm};
use super::ops;
use super::safetensors_io::{self, TensorSet};
use axl_kernels::token_loss::LossOptions;
use axl_kernels::{cross_entropy, cut_cross_entropy, fused_linear_cross_entropy};

/// How weights are loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Compute dtype (f32 on CPU).
    pub dtype: DType,
    /// Device to run on.
    pub device: Device,
    /// Whether the base weights are trained (full fine-tuning) rather than frozen.
    pub trainable: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            trainable: false,
        }
    }
}

/// Self-attention of one decoder layer.
#[derive(Clone, Debug)]
pub struct Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    /// Per-head RMS norm of queries (qwen3).
    pub q_norm: Option<RmsNorm>,
    /// Per-head RMS norm of keys (qwen3).
    pub k_norm: Option<RmsNorm>,
    /// Full or sliding-window attention.
    pub kind: LayerAttention,
}

/// The gated MLP `down(act(gate(x)) * up(x))`.
#[derive(Clone, Debug)]
pub struct Mlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
    /// Activation applied to the gate.
    pub activation: Activation,
}

/// One decoder layer. Llama-style layers have `attn_in` and `ff_in` norms; Gemma 2 also
/// normalizes the outputs of attention and MLP (`attn_out`, `ff_out`).
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    /// Norm before attention (`input_layernorm`).
    pub attn_in: RmsNorm,
    /// Norm after attention (Gemma 2's `post_attention_layernorm`).
    pub attn_out: Option<RmsNorm>,
    /// Norm before the MLP (`post_attention_layernorm`, or Gemma 2's `pre_feedforward_layernorm`).
    pub ff_in: RmsNorm,
    /// Norm after the MLP (Gemma 2's `post_feedforward_layernorm`).
    pub ff_out: Option<RmsNorm>,
    /// Self-attention.
    pub self_attn: Attention,
    /// Gated MLP.
    pub mlp: Mlp,
}

/// Keys and values of one layer, in buffers with room to grow: appending a token writes it in
/// place, so a decoding step never copies the cached prefix.
#[derive(Clone, Debug)]
struct LayerKv {
    keys: Tensor,
    values: Tensor,
}

impl LayerKv {
    /// Writes `k`, `v` (`[batch, new, kv_heads, head_dim]`) after the first `len` positions and
    /// returns views of all `len + new` positions.
    fn append(
        slot: &mut Option<Self>,
        len: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (batch, new, heads, dim) = k.dims4()?;
        let needed = len + new;
        let capacity = slot.as_ref().map_or(0, |s| s.keys.dim(1).unwrap_or(0));
        if needed > capacity {
            let grown = needed.max(capacity * 2).max(64);
            let keys = Tensor::zeros((batch, grown, heads, dim), k.dtype(), k.device())?;
            let values = Tensor::zeros((batch, grown, heads, dim), v.dtype(), v.device())?;
            if let Some(old) = slot.as_ref() {
                keys.slice_set(&old.keys.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                values.slice_set(&old.values.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            }
            *slot = Some(Self { keys, values });
        }
        let buffers = slot.as_ref().expect("allocated above");
        buffers.keys.slice_set(&k.contiguous()?, 1, len)?;
        buffers.values.slice_set(&v.contiguous()?, 1, len)?;
        Ok((
            buffers.keys.narrow(1, 0, needed)?,
            buffers.values.narrow(1, 0, needed)?,
        ))
    }
}

/// Keys and values of earlier positions, one entry per layer.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where packed sequences lie in each row of a batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackedLayout {
    /// Position of each token within its own sequence, per row.
    pub position_ids: Vec<Vec<usize>>,
    /// Which sequence of its row each token belongs to, per row.
    pub sequence_ids: Vec<Vec<usize>>,
}

impl PackedLayout {
    /// The layout of rows made of sequences of the given lengths (padding is a sequence too).
    pub fn from_lengths(rows: &[Vec<usize>]) -> Self {
        let mut layout = Self::default();
        for lengths in rows {
            let mut positions = Vec::new();
            let mut ids = Vec::new();
            for (sequence, &n) in lengths.iter().enumerate() {
                positions.extend(0..n);
                ids.extend(std::iter::repeat_n(sequence, n));
            }
            layout.position_ids.push(positions);
            layout.sequence_ids.push(ids);
        }
        layout
    }
}

/// What attention needs to know about the positions of one forward pass: rotary tables and
/// the mask of the layer's attention kind.
#[derive(Clone, Copy)]
struct Positions<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    mask: &'a Arc<CausalMask>,
}

/// A causal language model.
#[derive(Debug)]
pub struct CausalLm {
    /// The architecture description it was built from.
    pub config: ModelConfig,
    /// `model.embed_tokens`.
    pub embed_tokens: Embedding,
    /// `model.layers.*`.
    pub layers: Vec<DecoderLayer>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head`; shares the embedding's weight when tied.
    pub lm_head: Linear,
    rotary: ops::Rotary,
    dropout: Option<DropoutRng>,
    embedding_noise: Option<f64>,
    precision: Precision,
    kernels: KernelSelection,
    device: Device,
}

struct Loader<'a> {
    weights: &'a mut TensorSet,
    fresh: Option<FreshWeights>,
    trainable: bool,
}

/// How transformers initializes a parameter of each kind.
#[derive(Clone, Copy)]
enum Init {
    /// Linear and embedding weights: normal with `initializer_range` as standard deviation.
    Normal,
    /// Biases.
    Zeros,
    /// Norm weights: ones, or zeros where the norm multiplies by `1 + w` (gemma).
    Norm,
    /// The embedding: normal, with the padding token's row zero.
    Embedding { padding_row: Option<usize> },
}

/// The source of randomly initialized weights (`reinit_weights`).
struct FreshWeights {
    rng: rand_chacha::ChaCha8Rng,
    std: f32,
    one_plus_norms: bool,
    device: Device,
}

impl FreshWeights {
    fn tensor(&mut self, shape: &[usize], init: Init) -> Result<Tensor> {
        use rand::Rng;
        let n: usize = shape.iter().product();
        let mut values: Vec<f32> = match init {
            Init::Zeros => vec![0.0; n],
            Init::Norm => vec![if self.one_plus_norms { 0.0 } else { 1.0 }; n],
            Init::Normal | Init::Embedding { .. } => (0..n)
                .map(|_| {
                    // Box-Muller: two uniforms in (0, 1] give one standard normal value.
                    let u1: f32 = 1.0 - self.rng.random::<f32>();
                    let u2: f32 = self.rng.random::<f32>();
                    self.std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                })
                .collect(),
        };
        if let (
            Init::Embedding {
                padding_row: Some(row),
            },
            [rows, width],
        ) = (init, shape)
        {
            if row < *rows {
                values[row * width..(row + 1) * width].fill(0.0);
            }
        }
        Ok(Tensor::from_vec(values, shape, &self.device)?)
    }
}

impl Loader<'_> {
    fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Param> {
        let t = match &mut self.fresh {
            Some(fresh) => fresh.tensor(shape, init)?,
            None => self.weights.take(name, shape)?,
        };
        self.wrap(t)
    }

    fn wrap(&self, t: Tensor) -> Result<Param> {
        Ok(if self.trainable {
            Param::Trainable(candle_core::Var::from_tensor(&t)?)
        } else {
            Param::Frozen(t)
        })
    }

    fn linear(&mut self, path: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let weight = self.param(&format!("{path}.weight"), &[out, inp], Init::Normal)?;
        let bias = if bias {
            Some(self.param(&format!("{path}.bias"), &[out], Init::Zeros)?)
        } else {
            None
        };
        Ok(Linear {
            path: path.to_string(),
            weight,
            bias,
            lora: None,
            saved_with_adapter: false,
        })
    }

    fn norm(&mut self, path: &str, dim: usize, config: &ModelConfig) -> Result<RmsNorm> {
        Ok(RmsNorm {
            path: path.to_string(),
            weight: self.param(&format!("{path}.weight"), &[dim], Init::Norm)?,
            eps: config.rms_norm_eps,
            one_plus_weight: config.gemma_norms,
        })
    }
}

impl CausalLm {
    /// Loads a model directory: `config.json` and its safetensors weights.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let mut weights = safetensors_io::load_model_weights(dir, options.dtype, &options.device)?;
        Self::from_weights(config, &mut weights, options)
    }

    /// Builds the model from a config and a set of tensors named as transformers names them.
    /// Every tensor the architecture needs must be present with the right shape, and no
    /// tensor may be left over (a leftover means the checkpoint is of another layout).
    pub fn from_weights(
        config: ModelConfig,
        weights: &mut TensorSet,
        options: &LoadOptions,
    ) -> Result<Self> {
        Self::build(config, weights, None, options)
    }

    /// A model with fresh weights, initialized as transformers initializes them: linear and
    /// embedding weights normal with `initializer_range` as standard deviation, the padding
    /// token's embedding row and biases zero, norm weights one (zero for `1 + w` norms).
    /// The same seed gives the same weights.
    pub fn random_init(config: ModelConfig, seed: u64, options: &LoadOptions) -> Result<Self> {
        use rand::SeedableRng;
        let fresh = FreshWeights {
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            std: config.initializer_range as f32,
            one_plus_norms: config.gemma_norms,
            device: options.device.clone(),
        };
        let mut none = TensorSet::empty("<fresh weights>".into());
        Self::build(config, &mut none, Some(fresh), options)
    }

    fn build(
        config: ModelConfig,
        weights: &mut TensorSet,
        fresh: Option<FreshWeights>,
        options: &LoadOptions,
    ) -> Result<Self> {
        let c = &config;
        let mut l = Loader {
            weights,
            fresh,
            trainable: options.trainable,
        };
        let h = c.hidden_size;
        let q_out = c.num_attention_heads * c.head_dim;
        let kv_out = c.num_key_value_heads * c.head_dim;
        let embed_weight = l.param(
            "model.embed_tokens.weight",
            &[c.vocab_size, h],
            Init::Embedding {
                padding_row: c.pad_token_id.map(|id| id as usize),
            },
        )?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qkv_bias = c.attention_bias || c.qkv_bias;
            let self_attn = Attention {
                q_proj: l.linear(&format!("{p}.self_attn.q_proj"), q_out, h, qkv_bias)?,
                k_proj: l.linear(&format!("{p}.self_attn.k_proj"), kv_out, h, qkv_bias)?,
                v_proj: l.linear(&format!("{p}.self_attn.v_proj"), kv_out, h, qkv_bias)?,
                o_proj: l.linear(&format!("{p}.self_attn.o_proj"), h, q_out, c.attention_bias)?,
                q_norm: if c.qk_norm {
                    Some(l.norm(&format!("{p}.self_attn.q_norm"), c.head_dim, c)?)
                } else {
                    None
                },
                k_norm: if c.qk_norm {
                    Some(l.norm(&format!("{p}.self_attn.k_norm"), c.head_dim, c)?)
                } else {
                    None
                },
                kind: c.layer_attention[i],
            };
            let mlp = Mlp {
                gate_proj: l.linear(
                    &format!("{p}.mlp.gate_proj"),
                    c.intermediate_size,
                    h,
                    c.mlp_bias,
                )?,
                up_proj: l.linear(
                    &format!("{p}.mlp.up_proj"),
                    c.intermediate_size,
                    h,
                    c.mlp_bias,
                )?,
                down_proj: l.linear(
                    &format!("{p}.mlp.down_proj"),
                    h,
                    c.intermediate_size,
                    c.mlp_bias,
                )?,
                activation: c.activation,
            };
            let layer = if c.gemma_norms {
                DecoderLayer {
                    attn_in: l.norm(&format!("{p}.input_layernorm"), h, c)?,
                    attn_out: Some(l.norm(&format!("{p}.post_attention_layernorm"), h, c)?),
                    ff_in: l.norm(&format!("{p}.pre_feedforward_layernorm"), h, c)?,
                    ff_out: Some(l.norm(&format!("{p}.post_feedforward_layernorm"), h, c)?),
                    self_attn,
                    mlp,
                }
            } else {
                DecoderLayer {
                    attn_in: l.norm(&format!("{p}.input_layernorm"), h, c)?,
                    attn_out: None,
                    ff_in: l.norm(&format!("{p}.post_attention_layernorm"), h, c)?,
                    ff_out: None,
                    self_attn,
                    mlp,
                }
            };
            layers.push(layer);
        }
        let norm = l.norm("model.norm", h, c)?;
        let lm_head = if c.tie_word_embeddings {
            // A tied checkpoint may still carry a copy of the embedding as lm_head.weight.
            l.weights.take_opt("lm_head.weight", &[c.vocab_size, h])?;
            Linear {
                path: "lm_head".into(),
                weight: embed_weight.clone(),
                bias: None,
                lora: None,
                saved_with_adapter: false,
            }
        } else {
            if l.fresh.is_none() && !l.weights.contains("lm_head.weight") {
                return Err(ModelError::tensor(
                    &l.weights.source,
                    "lm_head.weight",
                    "missing (config.json says tie_word_embeddings is false)",
                ));
            }
            l.linear("lm_head", c.vocab_size, h, false)?
        };
        let leftover = l.weights.drain();
        if let Some((name, _, file)) = leftover.first() {
            return Err(ModelError::tensor(
                file,
                name,
                format!(
                    "not part of the {} architecture ({} unexpected tensor(s)); is config.json the one of these weights?",
                    c.architecture.model_type(),
                    leftover.len()
                ),
            ));
        }
        Ok(Self {
            rotary: ops::Rotary::new(&c.rope, c.head_dim),
            embed_tokens: Embedding {
                path: "model.embed_tokens".into(),
                weight: embed_weight,
                saved_with_adapter: false,
            },
            layers,
            norm,
            lm_head,
            dropout: None,
            embedding_noise: None,
            precision: Precision::F32,
            kernels: KernelSelection::default(),
            device: options.device.clone(),
            config,
        })
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Turns training-time dropout on (with a seeded stream) or off.
    pub fn set_dropout(&mut self, seed: Option<u64>) {
        self.dropout = seed.map(DropoutRng::new);
    }

    /// The precision of every linear layer's products (f32 unless set).
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// The kernels to run (the fused ones unless set).
    pub fn set_kernels(&mut self, kernels: KernelSelection) {
        self.kernels = kernels;
    }

    /// The kernels it runs.
    pub fn kernels(&self) -> &KernelSelection {
        &self.kernels
    }

    /// Whether the loss is computed from whole logits (see [`LossKernel::makes_logits`]).
    pub fn loss_makes_logits(&self) -> bool {
        self.kernels.loss.makes_logits()
    }

    /// NEFTune (arXiv 2310.05914): while training (dropout on), adds noise uniform in
    /// `±alpha / sqrt(len · hidden)` to the embeddings, as transformers' `neftune_noise_alpha`.
    pub fn set_embedding_noise(&mut self, alpha: Option<f64>) {
        self.embedding_noise = alpha;
    }

    /// Final hidden states `[batch, len, hidden]` for `input_ids` of shape `[batch, len]`.
    /// With a cache, the ids continue the cached positions and the cache is extended.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (_, len) = input_ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len);
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.is_empty() {
                c.layers = vec![None; self.layers.len()];
            }
        }
        let (cos, sin) = self.rotary.tables(past, len, &self.device)?;
        let masks = self.layer_masks(&|window| CausalMask::causal(past, window));
        let hidden = self.run_layers(
            input_ids,
            &cos,
            &sin,
            &masks,
            cache.as_deref_mut().map(|c| (c, past)),
        )?;
        if let Some(c) = cache {
            c.len = past + len;
        }
        Ok(hidden)
    }

    /// Final hidden states for rows that each hold several packed sequences: positions restart
    /// at every sequence and no token attends across sequences, so each sequence is computed
    /// exactly as if it were alone.
    pub fn hidden_states_packed(
        &self,
        input_ids: &Tensor,
        layout: &PackedLayout,
    ) -> Result<Tensor> {
        let (batch, len) = input_ids.dims2()?;
        if layout.position_ids.len() != batch || layout.position_ids.iter().any(|p| p.len() != len)
        {
            return Err(ModelError::Invalid(format!(
                "packed layout does not match input of shape [{batch}, {len}]"
            )));
        }
        let (cos, sin, masks) = self.uncached_positions(len, Some(layout))?;
        self.run_layers(input_ids, &cos, &sin, &masks, None)
    }

    /// The input of the first layer: embeddings, NEFTune noise while training, and gemma's
    /// `sqrt(hidden)` scaling.
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let mut x = self.embed_tokens.forward(input_ids)?;
        if let (Some(alpha), Some(rng)) = (self.embedding_noise, &self.dropout) {
            let (_, len, hidden) = x.dims3()?;
            let bound = alpha / ((len * hidden) as f64).sqrt();
            x = (&x + rng.uniform(x.dims(), bound, &self.device)?)?;
        }
        if self.config.gemma_norms {
            let normalizer = (self.config.hidden_size as f64).sqrt() as f32;
            x = (x * normalizer as f64)?;
        }
        Ok(x)
    }

    /// The causal-LM loss of a batch and `scale` times its gradients, with activation
    /// checkpointing (`gradient_checkpointing`): the forward pass keeps only each decoder
    /// layer's input, and the backward pass recomputes one layer at a time, replaying its
    /// dropout masks, so the gradients equal those of the plain backward pass while at most one
    /// layer's activations are alive. Returns the loss sum, the counted positions, and the
    /// gradients of the trainable parameters.
    ///
    /// Each partial backward pass also leaves gradients for the untracked tensors its ops read
    /// (frozen weights, rotary tables, masks); only the trainable parameters' are kept, so
    /// those of one layer are freed before the next layer is recomputed.
    pub fn checkpointed_loss_and_grads(
        &self,
        input_ids: &Tensor,
        layout: Option<&PackedLayout>,
        labels: &Tensor,
        scale: f64,
    ) -> Result<(f64, usize, GradStore)> {
        let (_, len) = input_ids.dims2()?;
        let (cos, sin, layer_masks) = self.uncached_positions(len, layout)?;
        let positions = |i: usize| Positions {
            cos: &cos,
            sin: &sin,
            mask: &layer_masks[i],
        };
        let mut inputs = vec![self.embed(input_ids)?.detach()];
        let mut rng_states = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            rng_states.push(self.dropout.as_ref().map(DropoutRng::state));
            let y = self.layer_forward(layer, &inputs[i], &positions(i), None)?;
            inputs.push(y.detach());
        }
        let trainable: Vec<Tensor> = self
            .trainable_params()
            .into_iter()
            .map(|(_, var)| var.as_tensor().clone())
            .collect();
        let mut grads = GradStore::default();
        let mut keep_trainable = |partial: &mut GradStore| -> Result<()> {
            for param in &trainable {
                if let Some(grad) = partial.remove(param) {
                    let sum = match grads.remove(param) {
                        Some(earlier) => (earlier + grad)?,
                        None => grad,
                    };
                    grads.insert(param, sum);
                }
            }
            Ok(())
        };
        let top = candle_core::Var::from_tensor(&inputs[self.layers.len()])?;
        let loss = self.token_loss(&self.normed(&self.norm, top.as_tensor())?, labels)?;
        let sum = loss.sum.to_scalar::<f32>()? as f64;
        let mut head_grads = (loss.sum * scale)?.backward()?;
        let after_head = self.dropout.as_ref().map(DropoutRng::state);
        let mut upstream = head_grads
            .remove(top.as_tensor())
            .ok_or_else(|| ModelError::Invalid("no gradient reached the last layer".into()))?;
        keep_trainable(&mut head_grads)?;
        drop(head_grads);
        for (i, layer) in self.layers.iter().enumerate().rev() {
            if let (Some(rng), Some(state)) = (&self.dropout, &rng_states[i]) {
                rng.set_state(state.clone());
            }
            let x = candle_core::Var::from_tensor(&inputs[i])?;
            let y = self.layer_forward(layer, x.as_tensor(), &positions(i), None)?;
            let mut layer_grads = (y * &upstream)?.sum_all()?.backward()?;
            upstream = layer_grads
                .remove(x.as_tensor())
                .ok_or_else(|| ModelError::Invalid(format!("no gradient reached layer {i}")))?;
            keep_trainable(&mut layer_grads)?;
        }
        if matches!(self.embed_tokens.weight, Param::Trainable(_)) {
            let x0 = self.embed(input_ids)?;
            keep_trainable(&mut (x0 * &upstream)?.sum_all()?.backward()?)?;
        }
        if let (Some(rng), Some(state)) = (&self.dropout, after_head) {
            rng.set_state(state);
        }
        Ok((sum, loss.count, grads))
    }

    /// One attention mask per layer, built once per kind of layer (full or sliding window).
    fn layer_masks(&self, mask_for: &dyn Fn(Option<usize>) -> CausalMask) -> Vec<Arc<CausalMask>> {
        let mut built: Vec<(LayerAttention, Arc<CausalMask>)> = Vec::new();
        let mut masks = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let kind = layer.self_attn.kind;
            let mask = match built.iter().find(|(k, _)| *k == kind) {
                Some((_, m)) => m.clone(),
                None => {
                    let window = match kind {
                        LayerAttention::Full => None,
                        LayerAttention::Sliding { window } => Some(window),
                    };
                    let m = Arc::new(mask_for(window));
                    built.push((kind, m.clone()));
                    m
                }
            };
            masks.push(mask);
        }
        masks
    }

    /// Rotary tables and per-layer masks for input without a cache: `len` positions from 0, or
    /// the sequences of packed rows.
    fn uncached_positions(
        &self,
        len: usize,
        layout: Option<&PackedLayout>,
    ) -> Result<(Tensor, Tensor, Vec<Arc<CausalMask>>)> {
        let (cos, sin) = match layout {
            Some(l) => self
                .rotary
                .tables_for_positions(&l.position_ids, &self.device)?,
            None => self.rotary.tables(0, len, &self.device)?,
        };
        let masks = self.layer_masks(&|window| match layout {
            Some(l) => CausalMask::packed(&l.sequence_ids, window),
            None => CausalMask::causal(0, window),
        });
        Ok((cos, sin, masks))
    }

    fn run_layers(
        &self,
        input_ids: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        masks: &[Arc<CausalMask>],
        mut cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let mut x = self.embed(input_ids)?;
        for (i, (layer, mask)) in self.layers.iter().zip(masks).enumerate() {
            let layer_cache = cache.as_mut().map(|(c, past)| (&mut c.layers[i], *past));
            x = self.layer_forward(layer, &x, &Positions { cos, sin, mask }, layer_cache)?;
        }
        self.normed(&self.norm, &x)
    }

    /// Logits `[batch, len, vocab]` from final hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self
            .lm_head
            .forward(hidden, self.dropout.as_ref(), self.precision)?;
        Ok(match self.config.final_logit_softcapping {
            Some(cap) => ops::soft_cap(&logits, cap)?,
            None => logits,
        })
    }

    /// Logits `[batch, len, vocab]` for `input_ids` `[batch, len]`.
    pub fn forward(&self, input_ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, cache)?;
        self.logits(&hidden)
    }

    fn layer_forward(
        &self,
        layer: &DecoderLayer,
        x: &Tensor,
        at: &Positions,
        cache: Option<(&mut Option<LayerKv>, usize)>,
    ) -> Result<Tensor> {
        let normed = self.normed(&layer.attn_in, x)?;
        let mut attn = self.attention(&layer.self_attn, &normed, at, cache)?;
        if let Some(n) = &layer.attn_out {
            attn = self.normed(n, &attn)?;
        }
        let x = (x + attn)?;
        let normed = self.normed(&layer.ff_in, &x)?;
        let mut ff = self.mlp(&layer.mlp, &normed)?;
        if let Some(n) = &layer.ff_out {
            ff = self.normed(n, &ff)?;
        }
        Ok((x + ff)?)
    }

    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        at: &Positions,
        cache: Option<(&mut Option<LayerKv>, usize)>,
    ) -> Result<Tensor> {
        let Positions { cos, sin, mask } = *at;
        let c = &self.config;
        let (batch, len, _) = x.dims3()?;
        let (heads, kv_heads, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let dropout = self.dropout.as_ref();
        // Heads stay in the layout the projections produce, [batch, len, heads, head_dim].
        let split = |t: Tensor, n: usize| t.reshape((batch, len, n, d));
        let mut q = split(attn.q_proj.forward(x, dropout, self.precision)?, heads)?;
        let mut k = split(attn.k_proj.forward(x, dropout, self.precision)?, kv_heads)?;
        let mut v = split(attn.v_proj.forward(x, dropout, self.precision)?, kv_heads)?;
        if let Some(n) = &attn.q_norm {
            q = self.normed(n, &q)?;
        }
        if let Some(n) = &attn.k_norm {
            k = self.normed(n, &k)?;
        }
        let scores = Scores {
            scale: c.attention_scale,
            softcap: c.attn_logit_softcapping,
        };
        let out = match (self.kernels.rope, cache) {
            // Training and whole-sequence passes: the attention op rotates q and k itself and
            // keeps no rotated copies for the backward pass.
            (Implementation::Fused, None) => {
                causal_attention_with_rope(&q, &k, &v, (cos, sin), mask, scores)?
            }
            (implementation, cache) => {
                let (q, mut k) = match implementation {
                    Implementation::Fused => (rope(&q, cos, sin)?, rope(&k, cos, sin)?),
                    Implementation::Reference => (
                        axl_kernels::rope::reference(&q, cos, sin)?,
                        axl_kernels::rope::reference(&k, cos, sin)?,
                    ),
                };
                if let Some((slot, past)) = cache {
                    (k, v) = LayerKv::append(slot, past, &k, &v)?;
                }
                causal_attention(&q, &k, &v, mask, scores)?
            }
        }
        .reshape((batch, len, heads * d))?;
        Ok(attn.o_proj.forward(&out, dropout, self.precision)?)
    }

    /// The causal-LM loss (transformers' shift: position `t` predicts `labels[t + 1]`) of the
    /// final hidden states `hidden` (`[batch, len, hidden]`, normalized), through the selected
    /// loss kernel: from whole logits, or fused with `lm_head` so the logits never exist
    /// whole. A detached `hidden` makes no gradients.
    pub fn token_loss(&self, hidden: &Tensor, labels: &Tensor) -> Result<ops::TokenLoss> {
        let targets = ops::shifted_targets(labels)?;
        let count = ops::counted(&targets);
        let softcap = self.config.final_logit_softcapping.map(|c| c as f32);
        let sum = match self.kernels.loss {
            LossKernel::Logits(implementation, options) => {
                let options = LossOptions { softcap, ..options };
                let logits = self
                    .lm_head
                    .forward(hidden, self.dropout.as_ref(), self.precision)?;
                match implementation {
                    Implementation::Fused => {
                        cross_entropy::cross_entropy_sum(&logits, &targets, &options)?
                    }
                    Implementation::Reference => {
                        cross_entropy::reference(&logits, &targets, &options)?
                    }
                }
            }
            LossKernel::FusedLinear(options, settings) => {
                let settings = fused_linear_cross_entropy::Settings {
                    precision: self.precision,
                    ..settings
                };
                fused_linear_cross_entropy::fused_linear_cross_entropy(
                    hidden,
                    &self.head_weight()?,
                    &targets,
                    &LossOptions { softcap, ..options },
                    settings,
                )?
            }
            LossKernel::Cut(options, settings) => {
                let settings = cut_cross_entropy::Settings {
                    precision: self.precision,
                    ..settings
                };
                cut_cross_entropy::cut_cross_entropy(
                    hidden,
                    &self.head_weight()?,
                    &targets,
                    &LossOptions { softcap, ..options },
                    settings,
                )?
            }
        };
        Ok(ops::TokenLoss { sum, count })
    }

    /// `lm_head`'s weight for a loss kernel fused with it, which takes a plain weight: no
    /// adapter, no bias.
    fn head_weight(&self) -> Result<Tensor> {
        self.check_head_fusable()?;
        Ok(self.lm_head.weight.tensor().clone())
    }

    /// Whether the selected loss kernel can run with this `lm_head`: one fused with the head
    /// takes a plain weight (trained or frozen), not a LoRA adapter or a bias.
    pub fn check_head_fusable(&self) -> Result<()> {
        if self.kernels.loss.makes_logits() {
            return Ok(());
        }
        if self.lm_head.lora.is_some() || self.lm_head.bias.is_some() {
            return Err(ModelError::Invalid(format!(
                "{} computes lm_head inside the loss and needs a plain weight, but lm_head has {}; leave lm_head out of lora_target_modules",
                self.kernels.loss.name(),
                if self.lm_head.lora.is_some() { "a LoRA adapter" } else { "a bias" }
            )));
        }
        Ok(())
    }

    /// `norm` applied to `x` with the selected kernel.
    fn normed(&self, norm: &RmsNorm, x: &Tensor) -> Result<Tensor> {
        Ok(match self.kernels.rms_norm {
            Implementation::Fused => norm.forward(x)?,
            Implementation::Reference => axl_kernels::rms_norm::reference(
                x,
                norm.weight.tensor(),
                norm.eps,
                norm.one_plus_weight,
            )?,
        })
    }

    fn mlp(&self, mlp: &Mlp, x: &Tensor) -> Result<Tensor> {
        let dropout = self.dropout.as_ref();
        let gate = mlp.gate_proj.forward(x, dropout, self.precision)?;
        let up = mlp.up_proj.forward(x, dropout, self.precision)?;
        let gate_activation = match mlp.activation {
            Activation::Silu => Some(GateActivation::Silu),
            Activation::GeluTanh => Some(GateActivation::GeluTanh),
            Activation::GeluErf => None,
        };
        let hidden = match (gate_activation, self.kernels.glu) {
            (Some(a), Implementation::Fused) => gated(&gate, &up, a)?,
            (Some(a), Implementation::Reference) => axl_kernels::glu::reference(&gate, &up, a)?,
            (None, _) => (gate.gelu_erf()? * up)?,
        };
        Ok(mlp.down_proj.forward(&hidden, dropout, self.precision)?)
    }

    /// Every linear layer, with its module path.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = Vec::new();
        for layer in &self.layers {
            let a = &layer.self_attn;
            let m = &layer.mlp;
            out.extend([
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ]);
        }
        if !self.config.tie_word_embeddings {
            out.push(&self.lm_head);
        }
        out
    }

    /// Every linear layer, mutably. A tied `lm_head` is included last, so that adapters and
    /// trainable copies can be attached to it too.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for layer in &mut self.layers {
            let a = &mut layer.self_attn;
            out.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
            let m = &mut layer.mlp;
            out.extend([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]);
        }
        out.push(&mut self.lm_head);
        out
    }

    /// Visits every parameter once, with its Hugging Face name (LoRA weights with PEFT's
    /// names without the `base_model.model.` prefix). A tied `lm_head` is not visited: its
    /// weight is the embedding's.
    pub fn visit_params(&self, f: &mut ParamVisitor) {
        self.embed_tokens.visit(f);
        for layer in &self.layers {
            layer.attn_in.visit(f);
            if let Some(n) = &layer.attn_out {
                n.visit(f);
            }
            layer.ff_in.visit(f);
            if let Some(n) = &layer.ff_out {
                n.visit(f);
            }
            let a = &layer.self_attn;
            for lin in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj] {
                lin.visit(f);
            }
            if let Some(n) = &a.q_norm {
                n.visit(f);
            }
            if let Some(n) = &a.k_norm {
                n.visit(f);
            }
            let m = &layer.mlp;
            for lin in [&m.gate_proj, &m.up_proj, &m.down_proj] {
                lin.visit(f);
            }
        }
        self.norm.visit(f);
        if !self.lm_head_is_tied() {
            self.lm_head.visit(f);
        } else if let Some(l) = &self.lm_head.lora {
            f("lm_head.lora_A.weight", &l.a);
            f("lm_head.lora_B.weight", &l.b);
        }
    }

    /// Replaces every parameter (LoRA weights included) by `f(name, param)`. A tied `lm_head`
    /// keeps sharing the embedding's (new) weight.
    pub fn map_params(&mut self, f: &mut dyn FnMut(&str, &Param) -> Param) {
        let tied = self.lm_head_is_tied();
        let map_linear = |lin: &mut Linear, f: &mut dyn FnMut(&str, &Param) -> Param| {
            lin.weight = f(&format!("{}.weight", lin.path), &lin.weight);
            if let Some(b) = &lin.bias {
                lin.bias = Some(f(&format!("{}.bias", lin.path), b));
            }
            if let Some(l) = &mut lin.lora {
                l.a = f(&format!("{}.lora_A.weight", lin.path), &l.a);
                l.b = f(&format!("{}.lora_B.weight", lin.path), &l.b);
            }
        };
        let map_norm = |n: &mut RmsNorm, f: &mut dyn FnMut(&str, &Param) -> Param| {
            n.weight = f(&format!("{}.weight", n.path), &n.weight);
        };
        self.embed_tokens.weight = f(
            &format!("{}.weight", self.embed_tokens.path),
            &self.embed_tokens.weight,
        );
        for layer in &mut self.layers {
            for n in [
                Some(&mut layer.attn_in),
                layer.attn_out.as_mut(),
                Some(&mut layer.ff_in),
                layer.ff_out.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                map_norm(n, f);
            }
            let a = &mut layer.self_attn;
            for n in [a.q_norm.as_mut(), a.k_norm.as_mut()].into_iter().flatten() {
                map_norm(n, f);
            }
            for lin in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
                map_linear(lin, f);
            }
            let m = &mut layer.mlp;
            for lin in [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj] {
                map_linear(lin, f);
            }
        }
        map_norm(&mut self.norm, f);
        if tied {
            self.lm_head.weight = self.embed_tokens.weight.clone();
            if let Some(l) = &mut self.lm_head.lora {
                l.a = f("lm_head.lora_A.weight", &l.a);
                l.b = f("lm_head.lora_B.weight", &l.b);
            }
        } else {
            map_linear(&mut self.lm_head, f);
        }
    }

    /// Stops `lm_head` from sharing the embedding: it keeps its current weight as its own, and
    /// the config says so (`tie_word_embeddings: false`), so saving writes `lm_head.weight`.
    pub fn untie_lm_head(&mut self) {
        self.config.tie_word_embeddings = false;
        self.config
            .raw
            .insert("tie_word_embeddings".into(), serde_json::Value::Bool(false));
    }

    /// Whether `lm_head` still shares the embedding's weight tensor.
    pub fn lm_head_is_tied(&self) -> bool {
        self.config.tie_word_embeddings && !self.lm_head.saved_with_adapter
    }

    /// Every parameter with its name, in a stable order.
    pub fn named_params(&self) -> Vec<(String, Param)> {
        let mut out = Vec::new();
        self.visit_params(&mut |n, p| out.push((n.to_string(), p.clone())));
        out
    }

    /// The trainable parameters with their names.
    pub fn trainable_params(&self) -> Vec<(String, candle_core::Var)> {
        let mut out = Vec::new();
        self.visit_params(&mut |n, p| {
            if let Some(v) = p.var() {
                out.push((n.to_string(), v.clone()));
            }
        });
        out
    }
}
