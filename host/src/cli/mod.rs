//! The `axl` command line: argument parsing and one module per command.

mod evaluate;
mod inference;
mod merge_lora;
mod plugin_cmd;
pub mod plugins;
mod preprocess;
pub mod scaffold;
mod train;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// axl: fine-tune large language models from an Axolotl YAML file.
#[derive(Debug, Parser)]
#[command(name = "axl", version, about)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Merge a trained LoRA adapter into the base model; writes <output_dir>/merged/.
    MergeLora(MergeLoraArgs),
    /// Generate text from a prompt read on standard input, streamed as it is produced.
    Inference(InferenceArgs),
    /// Tokenize the datasets into the prepared-dataset cache (reused when nothing changed).
    Preprocess(PreprocessArgs),
    /// Train: preprocess if needed, train, evaluate, save checkpoints and the result.
    Train(TrainArgs),
    /// Evaluate the model (with its trained adapter) on the evaluation set; writes
    /// <output_dir>/eval_results.json.
    Evaluate(TrainArgs),
    /// Scaffold, inspect and list plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Print the JSON schema of a configuration: axl's keys, and those of the plugins CONFIG
    /// loads.
    ConfigSchema {
        /// A configuration whose plugins' keys to include.
        config: Option<PathBuf>,
    },
    /// A command a plugin provides (`axl lm-eval config.yml ...`): the config comes first.
    #[command(external_subcommand)]
    External(Vec<String>),
}

/// `axl plugin ...`.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Write a new plugin crate that builds offline and loads as it is.
    New {
        /// The plugin's name (lowercase letters, digits, `_`).
        name: String,
        /// WebAssembly component (sandboxed) or native library (trusted).
        #[arg(long, value_enum, default_value = "wasm")]
        kind: scaffold::Kind,
        /// What the plugin starts as.
        #[arg(long, value_enum, default_value = "callback")]
        template: scaffold::Template,
        /// Where to write it (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Show what a plugin file is and whether this axl can load it.
    Check {
        /// A .wasm component or a native library.
        file: PathBuf,
    },
    /// Show the plugins a configuration loads, in order.
    List {
        /// The configuration file.
        config: PathBuf,
    },
}

impl Command {
    /// Whether the command runs a model (and so allocates tensors at a high rate).
    pub fn runs_a_model(&self) -> bool {
        !matches!(
            self,
            Self::Preprocess(_) | Self::Plugin(_) | Self::ConfigSchema { .. }
        )
    }
}

/// Which model to use, replacing the configuration's keys.
#[derive(Debug, Args, Clone, Default)]
pub struct ModelArgs {
    /// The base model directory or Hub id (replaces base_model).
    #[arg(long = "base-model", alias = "base_model")]
    pub base_model: Option<String>,
    /// The trained adapter's directory (replaces lora_model_dir).
    #[arg(long = "lora-model-dir", alias = "lora_model_dir")]
    pub lora_model_dir: Option<String>,
}

/// Arguments of `axl merge-lora`.
#[derive(Debug, Args)]
pub struct MergeLoraArgs {
    /// The configuration file.
    pub config: PathBuf,
    /// Model selection.
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Arguments of `axl train` and `axl evaluate`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The configuration file.
    pub config: PathBuf,
    /// Model selection.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Configuration overrides: `--learning-rate 1e-4`, `--micro_batch_size 2`, `--a__b v` for
    /// the nested key `a.b`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "--KEY VALUE"
    )]
    pub overrides: Vec<String>,
}

/// Arguments of `axl preprocess`.
#[derive(Debug, Args)]
pub struct PreprocessArgs {
    /// The configuration file.
    pub config: PathBuf,
    /// Model selection (for its tokenizer).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Show examples token by token, trained and masked tokens told apart.
    #[arg(long)]
    pub debug: bool,
    /// How many examples `--debug` shows.
    #[arg(
        long = "debug-num-examples",
        alias = "debug_num_examples",
        default_value_t = 1
    )]
    pub debug_num_examples: usize,
    /// With `--debug`: one JSON object per example (`text`, `input_ids`, `labels`).
    #[arg(long, requires = "debug")]
    pub json: bool,
}

/// Arguments of `axl inference`.
#[derive(Debug, Args)]
pub struct InferenceArgs {
    /// The configuration file.
    pub config: PathBuf,
    /// Model selection.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Upper bound on generated tokens.
    #[arg(
        long = "max-new-tokens",
        alias = "max_new_tokens",
        default_value_t = 1024
    )]
    pub max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.9)]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long = "top-p", alias = "top_p", default_value_t = 0.95)]
    pub top_p: f64,
    /// Top-k sampling (0 = off).
    #[arg(long = "top-k", alias = "top_k", default_value_t = 40)]
    pub top_k: usize,
    /// Repetition penalty (1 = off).
    #[arg(
        long = "repetition-penalty",
        alias = "repetition_penalty",
        default_value_t = 1.1
    )]
    pub repetition_penalty: f64,
    /// Always take the most likely token.
    #[arg(long)]
    pub greedy: bool,
    /// Seed of the sampling stream.
    #[arg(long)]
    pub seed: Option<u64>,
    /// How the prompt is formatted: `chat` (chat template), `dataset` (the first dataset's
    /// instruction format), `alpaca`, or `none` (raw text). By default: the chat template when
    /// `chat_template` is set or the first dataset is a conversation, else the first dataset's
    /// instruction format, else raw text.
    #[arg(long)]
    pub prompter: Option<String>,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::MergeLora(args) => merge_lora::run(args),
        Command::Inference(args) => inference::run(args),
        Command::Preprocess(args) => preprocess::run(args),
        Command::Train(args) => train::run(args),
        Command::Evaluate(args) => evaluate::run(args),
        Command::Plugin(PluginCommand::New {
            name,
            kind,
            template,
            dir,
        }) => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            scaffold::new(&name, kind, template, &dir)
        }
        Command::Plugin(PluginCommand::Check { file }) => plugin_cmd::check(&file),
        Command::Plugin(PluginCommand::List { config }) => plugin_cmd::list(&config),
        Command::ConfigSchema { config } => plugin_cmd::config_schema(config.as_deref()),
        Command::External(args) => plugin_cmd::external(&args),
    }
}

impl ModelArgs {
    fn overrides(&self) -> crate::setup::ModelOverrides {
        crate::setup::ModelOverrides {
            base_model: self.base_model.clone(),
            lora_model_dir: self.lora_model_dir.clone(),
        }
    }
}
