//! Downloading `base_model` from a Hub: a real HTTP server on loopback serves a fixture the way
//! the Hugging Face Hub serves files, and the model lands in the HF cache layout, loads, and is
//! found there again offline.

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

/// A loopback server answering `GET /{repo}/resolve/main/{file}` with Range support, the
/// `x-repo-commit` and `etag` headers, and 404 for files it does not have.
struct HubServer {
    address: String,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HubServer {
    fn start(repo: &str, files: HashMap<String, Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, halt, prefix) = (requests.clone(), stop.clone(), format!("/{repo}/resolve/main/"));
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming().take(1000) {
                if halt.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    serve(stream, &prefix, &files, &log);
                }
            }
        });
        Self { address, requests, stop, thread: Some(thread) }
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

fn serve(stream: TcpStream, prefix: &str, files: &HashMap<String, Vec<u8>>, log: &Mutex<Vec<String>>) {
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
            let start = bounds.next().and_then(|s| s.parse::<usize>().ok()).unwrap_or(0);
            range = Some((start, bounds.next().and_then(|s| s.parse::<usize>().ok())));
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
    log.lock().unwrap().push(path.clone());
    let mut out = stream;
    let body = path.strip_prefix(prefix).and_then(|f| files.get(f));
    let response = match body {
        None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
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
            files.insert(name, std::fs::read(entry.path()).unwrap());
        }
    }
    let server = HubServer::start("org/tiny-qwen2", files);
    let cache = tempfile::tempdir().unwrap();
    let online = HubSettings {
        cache_dirs: vec![cache.path().to_path_buf()],
        offline: false,
        endpoint: Some(server.address.clone()),
        token: None,
    };
    let dir = resolve_model("org/tiny-qwen2", &online).unwrap();
    let expected: PathBuf = cache.path().join(format!("models--org--tiny-qwen2/snapshots/{COMMIT}"));
    assert_eq!(dir, expected);
    let requested = server.requests.lock().unwrap().clone();
    assert!(requested.iter().any(|p| p.ends_with("/model.safetensors")), "{requested:?}");

    let refs = reference("qwen2");
    let model = CausalLm::load(&dir, &LoadOptions::default()).unwrap();
    let diff = max_abs_diff(&model.forward(&get(&refs, "input_ids"), None).unwrap(), &get(&refs, "logits"));
    assert!(diff <= 1e-4, "downloaded model gives other logits ({diff})");
    assert!(dir.join("tokenizer.json").is_file() && dir.join("generation_config.json").is_file());

    drop(server);
    let offline = HubSettings { offline: true, endpoint: None, ..online };
    assert_eq!(resolve_model("org/tiny-qwen2", &offline).unwrap(), expected);
}
