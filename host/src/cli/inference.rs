//! `axl inference`: reads a prompt from standard input (piped, or typed and ended with
//! Ctrl-D), formats it as the configuration says, and streams the generated text.

use std::io::{IsTerminal, Read, Write};

use anyhow::{bail, Context};

use super::InferenceArgs;
use axl_plugin_prompt_strategies::instruct::InstructStrategy;

use crate::chat_template::{self, ChatTemplate, Message, SpecialTokens};
use crate::config::LoadedConfig;
use crate::data::config::DatasetType;
use crate::data::strategy::{entry_as_configured, DatasetEntry, USER_DEFINED_TYPE};
use crate::model::generate::{Decoder, SamplingParams, TextStream};
use crate::model::resolve::HubSettings;
use crate::model::tokenizer::ModelTokenizer;
use crate::model::{lora, LoadOptions};
use crate::setup;

enum Prompter {
    Chat(Box<ChatTemplate>, SpecialTokens),
    Instruct(Box<InstructStrategy>),
    Raw,
}

impl Prompter {
    fn format(&self, input: &str, tokenizer: &ModelTokenizer) -> anyhow::Result<Vec<u32>> {
        Ok(match self {
            Self::Chat(t, special) => {
                let text = t.render(&[Message::new("user", input)], true, special)?;
                tokenizer.encode(&text, false)?
            }
            Self::Instruct(s) => tokenizer.encode(&s.prompt(input), true)?,
            Self::Raw => tokenizer.encode(input, true)?,
        })
    }
}

fn chat_template_source(cfg: &LoadedConfig, tokenizer: &ModelTokenizer) -> anyhow::Result<String> {
    let name = cfg
        .config
        .chat_template
        .as_deref()
        .unwrap_or("tokenizer_default");
    let from_tokenizer = || tokenizer.chat_template.clone();
    if name == "tokenizer_default" {
        return from_tokenizer().with_context(|| {
            format!(
                "chat_template: tokenizer_default, but {} has no chat template",
                tokenizer.dir.display()
            )
        });
    }
    if let Some(fallback) = name.strip_prefix("tokenizer_default_fallback_") {
        if let Some(t) = from_tokenizer() {
            return Ok(t);
        }
        return chat_template::builtin(fallback)
            .map(str::to_string)
            .with_context(|| {
                format!("chat_template: built-in template `{fallback}` is not available yet")
            });
    }
    if name == "jinja" {
        let source = cfg.config.chat_template_jinja.clone().context(
            "chat_template: jinja needs chat_template_jinja (the template, or a path to it)",
        )?;
        let path = cfg.resolve_path(&source);
        if !source.contains("{%") && !source.contains("{{") && path.is_file() {
            return std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()));
        }
        return Ok(source);
    }
    chat_template::builtin(name)
        .map(str::to_string)
        .with_context(|| format!("chat_template: built-in template `{name}` is not available yet"))
}

/// The instruction format of the first dataset, if its type is one of the built-in
/// instruction strategies.
fn dataset_format(cfg: &LoadedConfig) -> Option<InstructStrategy> {
    let ds = cfg.config.datasets.as_ref()?.first()?;
    let name = match ds.kind.as_ref()? {
        DatasetType::UserDefined(_) => USER_DEFINED_TYPE,
        DatasetType::Name(name) => name
            .strip_prefix("axolotl.prompt_strategies.")
            .unwrap_or(name),
    };
    let entry = DatasetEntry {
        dataset_type: name.to_string(),
        config: entry_as_configured(ds),
    };
    InstructStrategy::for_entry(&entry, false)?.ok()
}

fn prompter(
    cfg: &LoadedConfig,
    args: &InferenceArgs,
    tokenizer: &ModelTokenizer,
) -> anyhow::Result<Prompter> {
    let dataset_is_chat = cfg
        .config
        .datasets
        .as_ref()
        .and_then(|d| d.first())
        .and_then(|d| d.type_name())
        == Some("chat_template");
    let choice = match args.prompter.as_deref() {
        Some(p) => p.to_ascii_lowercase(),
        None if cfg.config.chat_template.is_some() || dataset_is_chat => "chat".into(),
        None if dataset_format(cfg).is_some() => "dataset".into(),
        None => "none".into(),
    };
    Ok(match choice.as_str() {
        "chat" => {
            let source = chat_template_source(cfg, tokenizer)?;
            let special = SpecialTokens {
                bos_token: tokenizer.bos.as_ref().map(|t| t.0.clone()),
                eos_token: tokenizer.eos.as_ref().map(|t| t.0.clone()),
                pad_token: tokenizer.pad.as_ref().map(|t| t.0.clone()),
                unk_token: None,
            };
            Prompter::Chat(Box::new(ChatTemplate::new(&source)?), special)
        }
        "dataset" => Prompter::Instruct(Box::new(
            dataset_format(cfg)
                .context("--prompter dataset: the first dataset has no instruction format")?,
        )),
        "alpaca" => Prompter::Instruct(Box::new(
            InstructStrategy::by_name("alpaca", None, false)
                .expect("alpaca is built in")
                .map_err(anyhow::Error::msg)?,
        )),
        "none" | "raw" => Prompter::Raw,
        other => bail!("--prompter {other}: expected chat, dataset, alpaca or none"),
    })
}

pub fn run(args: InferenceArgs) -> anyhow::Result<()> {
    let (cfg, _plugins) = super::plugins::load_config(&args.config, &[], "inference")?;
    let overrides = args.model.overrides();
    let sources = setup::model_sources(&cfg, &overrides, &HubSettings::from_env())?;
    let tokenizer = setup::load_configured_tokenizer(&cfg, &sources)?;
    let mut model = setup::load_base(&sources, &LoadOptions::default())?;
    let tokens = tokenizer.inner.get_vocab_size(true);
    if tokens > model.config.vocab_size {
        bail!(
            "the tokenizer in {} has {tokens} tokens but the model in {} embeds only {}; are they of the same model?",
            sources.tokenizer_dir.display(),
            sources.config_dir.display(),
            model.config.vocab_size
        );
    }
    if cfg.config.adapter.is_some() || overrides.lora_model_dir.is_some() {
        match setup::trained_adapter_dir(&cfg, &overrides) {
            Some(dir) => {
                lora::load_adapter(&mut model, &dir, false)?;
                eprintln!("using the adapter in {}", dir.display());
            }
            None => eprintln!("no trained adapter found (lora_model_dir is unset and output_dir has none): using the base model"),
        }
    }
    let prompter = prompter(&cfg, &args, &tokenizer)?;
    let params = SamplingParams {
        max_new_tokens: args.max_new_tokens,
        do_sample: !args.greedy && args.temperature > 0.0,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed.or(cfg.config.seed).unwrap_or(42),
    };
    let stop = tokenizer.stop_ids(&model.config.eos_token_ids);
    let interactive = std::io::stdin().is_terminal();
    loop {
        if interactive {
            eprintln!("Give me an instruction (Ctrl + D to submit):");
        }
        let mut input = String::new();
        std::io::stdin()
            .read_to_string(&mut input)
            .context("reading the prompt from standard input")?;
        let input = input.trim_end_matches('\n');
        if input.trim().is_empty() {
            if !interactive {
                bail!("no prompt on standard input");
            }
            return Ok(());
        }
        let ids = prompter.format(input, &tokenizer)?;
        let mut decoder = Decoder::new(&model, params.seed);
        let mut stream = TextStream::new();
        let mut stdout = std::io::stdout().lock();
        let mut write_error = None;
        decoder.generate(&ids, &params, &stop, &mut |id| {
            match stream.push(id, |all| tokenizer.decode(all, true)) {
                Ok(Some(piece)) => {
                    if let Err(e) = stdout
                        .write_all(piece.as_bytes())
                        .and_then(|_| stdout.flush())
                    {
                        write_error = Some(e);
                        return false;
                    }
                }
                Ok(None) => {}
                Err(_) => return false,
            }
            true
        })?;
        if let Some(e) = write_error {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(e).context("writing to standard output");
            }
            return Ok(());
        }
        let rest = stream.finish(|all| tokenizer.decode(all, true))?;
        writeln!(stdout, "{rest}")?;
        if !interactive {
            return Ok(());
        }
    }
}
