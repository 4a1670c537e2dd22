//! Writes the example datasets of axl and the tokenizer of its embedded default model, all
//! about one small made-up town whose people each have a home city, a job, a pet, a favorite
//! color and a favorite food.
//!
//! `axl-example-data [EXAMPLES_DIR]` (default `examples`) writes, deterministically:
//! - `data/town.jsonl.gz`: short stories about the townspeople (`{"text"}`), the pretraining
//!   corpus of the default model (`examples/pretrain.yml`);
//! - `data/town_questions.jsonl`: Alpaca-style questions and answers about most townspeople
//!   (`{"instruction", "input", "output"}`), the instruction task of `examples/quickstart.yml`;
//! - `data/town_questions_eval.jsonl`: the same questions about the townspeople left out of
//!   the training questions, whose facts the model can only know from pretraining;
//! - `tiny-llama-init/`: `config.json` of the default model's shape, and `tokenizer.json`,
//!   a byte-level BPE tokenizer trained on the corpus.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context;
use axl_example_data::train_byte_level_bpe;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use tokenizers::processors::template::TemplateProcessing;

const NAMES: &[&str] = &[
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Kate",
    "Leo", "Maya", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yara",
    "Zane", "Alice", "Boris", "Chloe", "Dario", "Elena", "Frank", "Gina", "Henry", "Ines", "Jonas",
    "Lena", "Marco", "Nina", "Oscar", "Petra", "Ruth", "Simon", "Tom", "Ursula", "Victor", "Wendy",
    "Xavier", "Yusuf", "Zoe",
];
const CITIES: &[&str] = &[
    "Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Rome", "Delhi", "Quito", "Dakar", "Perth", "Seoul",
    "Vienna", "Lagos", "Hanoi", "Madrid", "Boston",
];
const JOBS: &[&str] = &[
    "baker", "doctor", "teacher", "farmer", "pilot", "painter", "nurse", "sailor", "tailor",
    "miner", "singer", "judge",
];
const PETS: &[&str] = &[
    "cat", "dog", "parrot", "rabbit", "goat", "horse", "turtle", "hamster", "duck", "pony",
    "snake", "frog",
];
const COLORS: &[&str] = &[
    "red", "blue", "green", "yellow", "purple", "orange", "black", "white",
];
const FOODS: &[&str] = &[
    "apples", "bread", "rice", "soup", "cheese", "noodles", "fish", "cake", "beans", "plums",
];
const WEATHER: &[&str] = &["sunny", "rainy", "cold", "warm", "windy", "quiet", "long"];
const PLACES: &[&str] = &[
    "market", "park", "library", "river", "station", "garden", "square",
];

/// The start of the prompt of Axolotl's `alpaca` type.
const ALPACA_PROMPT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n";

/// Townspeople whose questions are kept for evaluation: every sixth one.
const EVAL_EVERY: usize = 6;

struct Person {
    name: &'static str,
    city: &'static str,
    job: &'static str,
    pet: &'static str,
    color: &'static str,
    food: &'static str,
}

/// One fact about a person, as the sentences of a story may state it.
#[derive(Clone, Copy)]
enum Fact {
    City,
    Job,
    Pet,
    Color,
    Food,
}

const FACTS: [Fact; 5] = [Fact::City, Fact::Job, Fact::Pet, Fact::Color, Fact::Food];

impl Person {
    fn statement(&self, fact: Fact, rng: &mut ChaCha8Rng) -> String {
        let n = self.name;
        let choices: Vec<String> = match fact {
            Fact::City => vec![
                format!("{n} lives in {}.", self.city),
                format!("The home of {n} is in {}.", self.city),
                format!("{n} has lived in {} for many years.", self.city),
            ],
            Fact::Job => vec![
                format!("{n} works as a {}.", self.job),
                format!("{n} is a {}.", self.job),
                format!("By day, {n} works as a {}.", self.job),
            ],
            Fact::Pet => vec![
                format!("{n} has a {}.", self.pet),
                format!("{n} has a pet {}.", self.pet),
                format!("{n} takes care of a {}.", self.pet),
            ],
            Fact::Color => vec![
                format!("The favorite color of {n} is {}.", self.color),
                format!("{n} likes the color {} best.", self.color),
                format!("{n} always wears something {}.", self.color),
            ],
            Fact::Food => vec![
                format!("{n} likes to eat {}.", self.food),
                format!("The favorite food of {n} is {}.", self.food),
                format!("For dinner, {n} often has {}.", self.food),
            ],
        };
        choices.choose(rng).expect("non-empty").clone()
    }

    /// The answer the instruction data teaches for a fact: always the first phrasing.
    fn answer(&self, fact: Fact) -> String {
        let n = self.name;
        match fact {
            Fact::City => format!("{n} lives in {}.", self.city),
            Fact::Job => format!("{n} works as a {}.", self.job),
            Fact::Pet => format!("{n} has a {}.", self.pet),
            Fact::Color => format!("The favorite color of {n} is {}.", self.color),
            Fact::Food => format!("{n} likes to eat {}.", self.food),
        }
    }

    fn questions(&self, fact: Fact) -> [String; 2] {
        let n = self.name;
        match fact {
            Fact::City => [
                format!("Where does {n} live?"),
                format!("In which city is the home of {n}?"),
            ],
            Fact::Job => [
                format!("What does {n} do for a living?"),
                format!("What is the job of {n}?"),
            ],
            Fact::Pet => [
                format!("What pet does {n} have?"),
                format!("Which animal does {n} take care of?"),
            ],
            Fact::Color => [
                format!("What is the favorite color of {n}?"),
                format!("Which color does {n} like best?"),
            ],
            Fact::Food => [
                format!("What does {n} like to eat?"),
                format!("What is the favorite food of {n}?"),
            ],
        }
    }
}

fn town(rng: &mut ChaCha8Rng) -> Vec<Person> {
    NAMES
        .iter()
        .map(|&name| Person {
            name,
            city: CITIES.choose(rng).expect("non-empty"),
            job: JOBS.choose(rng).expect("non-empty"),
            pet: PETS.choose(rng).expect("non-empty"),
            color: COLORS.choose(rng).expect("non-empty"),
            food: FOODS.choose(rng).expect("non-empty"),
        })
        .collect()
}

/// A short story: two to five facts about one or two people, with some plain sentences.
fn story(town: &[Person], rng: &mut ChaCha8Rng) -> String {
    let first = town.choose(rng).expect("non-empty");
    let mut cast = vec![first];
    if rng.random_bool(0.4) {
        let second = town.choose(rng).expect("non-empty");
        if second.name != first.name {
            cast.push(second);
        }
    }
    let mut sentences = Vec::new();
    for person in &cast {
        let mut facts = FACTS.to_vec();
        facts.shuffle(rng);
        let count = rng.random_range(2..=5);
        for &fact in facts.iter().take(count) {
            sentences.push(person.statement(fact, rng));
        }
    }
    if rng.random_bool(0.5) {
        sentences.push(format!(
            "It was a {} day in the town.",
            WEATHER.choose(rng).expect("non-empty")
        ));
    }
    if rng.random_bool(0.5) {
        let person = cast.choose(rng).expect("non-empty");
        sentences.push(format!(
            "{} went to the {}.",
            person.name,
            PLACES.choose(rng).expect("non-empty")
        ));
    }
    sentences.shuffle(rng);
    if let [a, b] = cast[..] {
        sentences.push(format!(
            "{} and {} met at the {}.",
            a.name,
            b.name,
            PLACES.choose(rng).expect("non-empty")
        ));
    }
    sentences.join(" ")
}

fn write_jsonl(path: &Path, rows: &[serde_json::Value]) -> anyhow::Result<()> {
    let mut text = String::new();
    for row in rows {
        text.push_str(&row.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn questions(people: &[&Person]) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    for person in people {
        for fact in FACTS {
            for question in person.questions(fact) {
                rows.push(
                    json!({"instruction": question, "input": "", "output": person.answer(fact)}),
                );
            }
        }
    }
    rows
}

fn train_tokenizer(corpus: &str, dir: &Path) -> anyhow::Result<()> {
    let add_bos = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .try_pair("<s> $A <s> $B")
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .special_tokens(vec![("<s>", 0)])
        .build()?;
    train_byte_level_bpe(
        corpus,
        1024,
        &["<s>", "</s>", "<pad>"],
        Some(add_bos.into()),
        dir,
    )?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "model_max_length": 1024,
        }))? + "\n",
    )?;
    Ok(())
}

fn write_model_config(dir: &Path) -> anyhow::Result<()> {
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 1024,
        "hidden_size": 192,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": true,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "torch_dtype": "float32",
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)? + "\n",
    )?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let root = std::env::args().nth(1).unwrap_or_else(|| "examples".into());
    let root = Path::new(&root);
    let data = root.join("data");
    let init = root.join("tiny-llama-init");
    std::fs::create_dir_all(&data)?;
    std::fs::create_dir_all(&init)?;
    let mut rng = ChaCha8Rng::seed_from_u64(20261122);
    let town = town(&mut rng);

    let stories: Vec<String> = (0..60_000).map(|_| story(&town, &mut rng)).collect();
    let corpus_path = data.join("town.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    for text in &stories {
        writeln!(gz, "{}", json!({ "text": text }))?;
    }
    std::fs::write(&corpus_path, gz.finish()?)
        .with_context(|| format!("writing {}", corpus_path.display()))?;

    let eval_people: Vec<&Person> = town.iter().step_by(EVAL_EVERY).collect();
    let train_people: Vec<&Person> = town
        .iter()
        .enumerate()
        .filter(|(i, _)| i % EVAL_EVERY != 0)
        .map(|(_, p)| p)
        .collect();
    let mut train_rows = questions(&train_people);
    train_rows.shuffle(&mut rng);
    write_jsonl(&data.join("town_questions.jsonl"), &train_rows)?;
    let eval_rows = questions(&eval_people);
    write_jsonl(&data.join("town_questions_eval.jsonl"), &eval_rows)?;

    // The tokenizer learns from everything the model will read: the stories, the questions
    // and the Alpaca prompt they are asked in.
    let mut tokenizer_corpus = stories.join("\n");
    for row in train_rows.iter().chain(&eval_rows) {
        tokenizer_corpus.push('\n');
        tokenizer_corpus.push_str(&format!(
            "{ALPACA_PROMPT}{}\n\n### Response:\n{}",
            row["instruction"].as_str().unwrap_or_default(),
            row["output"].as_str().unwrap_or_default()
        ));
    }
    train_tokenizer(&tokenizer_corpus, &init)?;
    write_model_config(&init)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "wrote {} stories, {} training questions, the tokenizer and config.json under {}",
        stories.len(),
        train_rows.len(),
        root.display()
    )?;
    Ok(())
}
