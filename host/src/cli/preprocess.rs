//! `axl preprocess`: prepares (or reuses) the tokenized datasets of a configuration and shows
//! what training will see: with `--debug`, examples token by token, trained and masked tokens
//! told apart; with `--debug --json`, one JSON object per example.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use super::PreprocessArgs;
use crate::data::{self, cache};
use crate::model::ops::IGNORE_INDEX;
use crate::model::resolve::HubSettings;
use crate::model::tokenizer::ModelTokenizer;
use crate::setup;

const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

pub fn run(args: PreprocessArgs) -> anyhow::Result<()> {
    let (cfg, _plugins) = super::plugins::load_config(&args.config, &[], "preprocess")?;
    let hub = HubSettings::from_env();
    let sources = setup::model_sources(&cfg, &args.model.overrides(), &hub)?;
    let tokenizer = setup::load_configured_tokenizer(&cfg, &sources)?;
    let start = Instant::now();
    let (prepared, status) = data::prepare_cached(&cfg, &tokenizer, &hub)?;
    let secs = start.elapsed().as_secs_f64();
    let rows: usize = prepared.reports.iter().map(|r| r.rows).sum();
    for r in &prepared.reports {
        eprintln!(
            "{}: {} rows -> {} examples ({} tokens, {} trained); dropped {} too long, {} too short; truncated {}",
            r.label, r.rows, r.examples, r.tokens, r.trained_tokens, r.dropped_too_long, r.dropped_too_short, r.truncated
        );
    }
    if status.reused {
        eprintln!(
            "reused the prepared dataset in {} ({} examples)",
            status.dir.display(),
            prepared.examples.len()
        );
    } else {
        eprintln!(
            "prepared {} examples from {rows} rows in {secs:.2} s ({:.0} rows/s) into {}",
            prepared.examples.len(),
            rows as f64 / secs.max(1e-9),
            status.dir.display()
        );
    }
    if cfg.config.sample_packing {
        let capacity = cfg.config.micro_batch_size.max(1) * cfg.config.sequence_len;
        let lengths: Vec<usize> = prepared.examples.iter().map(|e| e.len()).collect();
        let bins = crate::data::packing::pack_first_fit_decreasing(&lengths, capacity);
        eprintln!(
            "sample packing: {} examples into {} bins of {capacity} tokens, efficiency {:.1} %",
            lengths.len(),
            bins.len(),
            100.0 * crate::data::packing::packing_efficiency(&lengths, &bins, capacity)
        );
    }
    if args.debug {
        let shown = &prepared.examples[..args.debug_num_examples.min(prepared.examples.len())];
        let mut out = std::io::stdout().lock();
        if args.json {
            cache::write_json_lines(&mut out, shown, &|ids| {
                tokenizer.decode(ids, false).unwrap_or_default()
            })?;
        } else {
            let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            for (i, example) in shown.iter().enumerate() {
                writeln!(
                    out,
                    "--- example {i}: {} tokens, {} trained ---",
                    example.len(),
                    example.trained()
                )?;
                writeln!(out, "{}", render_tokens(example, &tokenizer, color))?;
            }
            if !color {
                writeln!(
                    out,
                    "(tokens in [brackets] are masked (label -100); the others are trained)"
                )?;
            }
        }
    }
    Ok(())
}

/// One line per example: each token's text followed by `(label, id)`; trained tokens green,
/// masked ones red (label 0 yellow) on a terminal, masked ones in `[brackets]` otherwise.
pub fn render_tokens(
    example: &data::example::Tokenized,
    tokenizer: &ModelTokenizer,
    color: bool,
) -> String {
    let mut line = String::new();
    for (id, label) in example.input_ids.iter().zip(&example.labels) {
        let text = tokenizer
            .decode(&[*id], false)
            .unwrap_or_default()
            .replace('\n', "\\n");
        let masked = *label == IGNORE_INDEX;
        if color {
            let c = if masked {
                RED
            } else if *label == 0 {
                YELLOW
            } else {
                GREEN
            };
            line.push_str(&format!("{c}{text}{RESET}{DIM}({label}, {id}){RESET} "));
        } else if masked {
            line.push_str(&format!("[{text}]({label}, {id}) "));
        } else {
            line.push_str(&format!("{text}({label}, {id}) "));
        }
    }
    line.trim_end().to_string()
}
