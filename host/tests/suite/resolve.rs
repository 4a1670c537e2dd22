//! Resolving `base_model`: local directories, Hub ids in the Hugging Face cache, and one clear
//! message listing every place searched when nothing is found offline.

use std::path::Path;

use axl::model::resolve::{resolve_model, HubSettings};

use super::common::fixture;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn offline(caches: Vec<std::path::PathBuf>) -> HubSettings {
    HubSettings {
        cache_dirs: caches,
        offline: true,
        endpoint: None,
        token: None,
    }
}

#[test]
fn local_directory_is_used_as_is() {
    let dir = fixture("llama");
    assert_eq!(
        resolve_model(dir.to_str().unwrap(), &offline(vec![])).unwrap(),
        dir
    );
}

#[test]
fn hub_id_resolves_to_the_cached_snapshot_of_refs_main() {
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    let repo = second.path().join("models--HuggingFaceTB--SmolLM2-135M");
    copy_dir(&fixture("llama"), &repo.join("snapshots/0123abcd"));
    copy_dir(&fixture("qwen2"), &repo.join("snapshots/old"));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let hub = offline(vec![
        first.path().to_path_buf(),
        second.path().to_path_buf(),
    ]);
    let dir = resolve_model("HuggingFaceTB/SmolLM2-135M", &hub).unwrap();
    assert_eq!(dir, repo.join("snapshots/0123abcd"));
    axl::model::CausalLm::load(&dir, &Default::default()).unwrap();
}

#[test]
fn nothing_found_offline_is_one_message_naming_every_place_searched() {
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_model(
        "org/missing-model",
        &offline(vec![cache.path().to_path_buf()]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("org/missing-model"), "{err}");
    assert!(
        err.contains(
            &cache
                .path()
                .join("models--org--missing-model")
                .display()
                .to_string()
        ),
        "{err}"
    );
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    let err = resolve_model("./models/absent", &offline(vec![]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("./models/absent (no such directory)"), "{err}");
}
