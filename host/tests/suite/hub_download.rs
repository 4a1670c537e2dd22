//! Downloading from a Hub: a real HTTP server on loopback serves fixtures the way the Hugging
//! Face Hub serves files; models and datasets land in the HF cache layout, load, and are found
//! there again offline.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axl::model::resolve::{resolve_model, HubSettings};
use axl::model::{CausalLm, LoadOptions};

use super::common::{fixture, get, max_abs_diff, reference};

const COMMIT: &str = "4f1c0ffee4f1c0ffee4f1c0ffee4f1c0ffee4f1c";

/// A loopback server answering `GET` for the paths it holds, with Range support, the
/// `x-repo-commit` and `etag` headers, and 404 for paths it does not have.
struct HubServer {
    address: String,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HubServer {
    fn start(files: HashMap<String, Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, halt) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming().take(1000) {
                if halt.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    serve(stream, &files, &log);
                }
            }
        });
        Self {
            address,
            requests,
            stop,
            thread: Some(thread),
        }
    }
}

impl HubServer {
    /// Settings that download from this server into `cache`.
    fn settings(&self, cache: &std::path::Path) -> HubSettings {
        HubSettings {
            cache_dirs: vec![cache.to_path_buf()],
            offline: false,
            endpoint: Some(self.address.clone()),
            token: None,
        }
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.address.trim_start_matches("http://"));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(stream: TcpStream, files: &HashMap<String, Vec<u8>>, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut range: Option<(usize, Option<usize>)> = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(r) = lower.strip_prefix("range: bytes=") {
            let mut bounds = r.trim().splitn(2, '-');
            let start = bounds
                .next()
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(0);
            range = Some((start, bounds.next().and_then(|s| s.parse::<usize>().ok())));
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    log.lock().unwrap().push(path.clone());
    let mut out = stream;
    let body = files.get(&path);
    let response = match body {
        None => {
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
        }
        Some(bytes) => {
            let (start, last) = range.unwrap_or((0, None));
            let start = start.min(bytes.len());
            let end = last.map_or(bytes.len(), |l| (l + 1).min(bytes.len()));
            let slice = &bytes[start..end];
            let mut head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\n\
                 ETag: \"{:016x}\"\r\nx-repo-commit: {COMMIT}\r\nConnection: close\r\n\r\n",
                slice.len(),
                start,
                end.saturating_sub(1),
                bytes.len(),
                bytes.len() as u64 * 2654435761,
            )
            .into_bytes();
            head.extend_from_slice(slice);
            head
        }
    };
    let _ = out.write_all(&response);
}

#[test]
fn model_is_downloaded_into_the_hf_cache_loads_and_is_reused_offline() {
    let mut files = HashMap::new();
    for entry in std::fs::read_dir(fixture("qwen2")).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name != "reference.safetensors" {
            files.insert(
                format!("/org/tiny-qwen2/resolve/main/{name}"),
                std::fs::read(entry.path()).unwrap(),
            );
        }
    }
    let server = HubServer::start(files);
    let cache = tempfile::tempdir().unwrap();
    let online = server.settings(cache.path());
    let dir = resolve_model("org/tiny-qwen2", &online).unwrap();
    let expected: PathBuf = cache
        .path()
        .join(format!("models--org--tiny-qwen2/snapshots/{COMMIT}"));
    assert_eq!(dir, expected);
    let requested = server.requests.lock().unwrap().clone();
    assert!(
        requested.iter().any(|p| p.ends_with("/model.safetensors")),
        "{requested:?}"
    );

    let refs = reference("qwen2");
    let model = CausalLm::load(&dir, &LoadOptions::default()).unwrap();
    let diff = max_abs_diff(
        &model.forward(&get(&refs, "input_ids"), None).unwrap(),
        &get(&refs, "logits"),
    );
    assert!(diff <= 1e-4, "downloaded model gives other logits ({diff})");
    assert!(dir.join("tokenizer.json").is_file() && dir.join("generation_config.json").is_file());

    drop(server);
    let offline = HubSettings {
        offline: true,
        endpoint: None,
        ..online
    };
    assert_eq!(resolve_model("org/tiny-qwen2", &offline).unwrap(), expected);
}

#[test]
fn dataset_is_downloaded_into_the_hf_cache_and_prepared_then_reused_offline() {
    let rows = "{\"instruction\": \"Say hi.\", \"input\": \"\", \"output\": \"Hi!\"}\n";
    let info = serde_json::json!({
        "id": "org/tiny-alpaca",
        "sha": COMMIT,
        "siblings": [{"rfilename": "README.md"}, {"rfilename": "data/train-00000-of-00001.jsonl"}, {"rfilename": "data/test-00000-of-00001.jsonl"}],
    });
    let files = HashMap::from([
        (
            "/api/datasets/org/tiny-alpaca/revision/main".to_string(),
            info.to_string().into_bytes(),
        ),
        (
            "/datasets/org/tiny-alpaca/resolve/main/data/train-00000-of-00001.jsonl".to_string(),
            rows.as_bytes().to_vec(),
        ),
        (
            "/datasets/org/tiny-alpaca/resolve/main/data/test-00000-of-00001.jsonl".to_string(),
            b"not json\n".to_vec(),
        ),
    ]);
    let server = HubServer::start(files);
    let cache = tempfile::tempdir().unwrap();
    let online = server.settings(cache.path());
    let ds: axl::data::config::DatasetConfig =
        serde_yaml::from_str("path: org/tiny-alpaca\ntype: alpaca").unwrap();
    let settings = super::data::settings();
    let tokenizer = super::data::tokenizer();
    let (examples, _) = axl::data::pipeline::prepare(
        std::slice::from_ref(&ds),
        &settings,
        &tokenizer,
        &online,
        cache.path(),
    )
    .unwrap();
    assert_eq!(super::data::texts(&examples[0]).1, "Hi!<|im_end|>");
    let requested = server.requests.lock().unwrap().clone();
    assert!(
        !requested.iter().any(|p| p.contains("test-0000")),
        "only the train split is fetched: {requested:?}"
    );
    assert!(cache
        .path()
        .join(format!(
            "datasets--org--tiny-alpaca/snapshots/{COMMIT}/data/train-00000-of-00001.jsonl"
        ))
        .is_file());

    drop(server);
    let offline = HubSettings {
        offline: true,
        endpoint: None,
        ..online
    };
    let (again, _) =
        axl::data::pipeline::prepare(&[ds], &settings, &tokenizer, &offline, cache.path()).unwrap();
    assert_eq!(again, examples);
    let missing: axl::data::config::DatasetConfig =
        serde_yaml::from_str("path: org/absent\ntype: alpaca").unwrap();
    let err =
        axl::data::pipeline::prepare(&[missing], &settings, &tokenizer, &offline, cache.path())
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("dataset `org/absent` not found locally") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}
