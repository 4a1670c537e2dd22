//! Training a byte-level BPE tokenizer (the GPT-2 / Llama 3 kind) on a text corpus, for the
//! example model and the benchmarks.

use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

/// Trains a byte-level BPE tokenizer of at most `vocab_size` tokens on `corpus`, with
/// `specials` as its first ids, and saves it as `tokenizer.json` in `dir`. `post_processor`
/// is what encoding adds around the text (e.g. a BOS token); `None` adds nothing.
pub fn train_byte_level_bpe(
    corpus: &str,
    vocab_size: usize,
    specials: &[&str],
    post_processor: Option<PostProcessorWrapper>,
    dir: &Path,
) -> anyhow::Result<()> {
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .show_progress(false)
        .special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let post_processor =
        post_processor.unwrap_or_else(|| ByteLevel::default().trim_offsets(false).into());
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
    .with_decoder(Some(ByteLevel::default().into()))
    .with_post_processor(Some(post_processor))
    .build()
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let corpus_file = dir.join("corpus.txt.tmp");
    std::fs::write(&corpus_file, corpus)?;
    let trained = tokenizer
        .train_from_files(
            &mut trainer,
            vec![corpus_file.to_string_lossy().to_string()],
        )
        .map_err(|e| anyhow::anyhow!("{e}"));
    std::fs::remove_file(&corpus_file)?;
    trained?;
    tokenizer
        .save(dir.join("tokenizer.json"), true)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
