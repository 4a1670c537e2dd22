//! Lark (Feishu) webhook notifications: the message SwanLab sends, signed as Lark's custom
//! bots expect (`sign = base64(HMAC-SHA256(key = "<timestamp>\n<secret>", message = ""))`).

use sha2::{Digest, Sha256};

/// HMAC-SHA256 of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The `sign` of a message sent at `timestamp` with `secret`.
pub fn sign(timestamp: u64, secret: &str) -> String {
    base64(&hmac_sha256(
        format!("{timestamp}\n{secret}").as_bytes(),
        b"",
    ))
}

/// What a notification is about.
#[derive(Clone, Debug, PartialEq)]
pub enum Occasion {
    /// Training started.
    Start,
    /// Training finished.
    Finish,
    /// Training failed.
    Error(String),
}

/// The fields the message names.
#[derive(Clone, Debug, Default)]
pub struct RunInfo {
    /// The project.
    pub project: String,
    /// The workspace.
    pub workspace: String,
    /// The experiment's name.
    pub experiment: String,
    /// Its description.
    pub description: String,
    /// Its page, where there is one.
    pub link: Option<String>,
}

/// The message text, in SwanLab's English form.
pub fn message(occasion: &Occasion, run: &RunInfo) -> String {
    let mut text = String::from("SwanLab Message Notification\n");
    text.push_str(&match occasion {
        Occasion::Start => "SwanLab | Your experiment has started\n".to_string(),
        Occasion::Finish => "SwanLab | Your experiment completed successfully\n".to_string(),
        Occasion::Error(e) => format!("Your SwanLab experiment encountered an error: {e}\n"),
    });
    text.push_str(&format!(
        "Project: {}\nWorkspace: {}\nName: {}\nDescription: {}",
        run.project, run.workspace, run.experiment, run.description
    ));
    if let Some(link) = &run.link {
        text.push_str(&format!("\nExperiment Link: {link}"));
    }
    text
}

/// The webhook's JSON body.
pub fn body(text: &str, timestamp: u64, secret: Option<&str>) -> serde_json::Value {
    let mut body = serde_json::json!({
        "timestamp": timestamp,
        "msg_type": "text",
        "content": {"text": text},
    });
    if let Some(secret) = secret {
        body["sign"] = serde_json::json!(sign(timestamp, secret));
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_larks() {
        // Python: base64(hmac.new(b"1700000000\nmy-secret", b"", sha256).digest())
        assert_eq!(
            sign(1_700_000_000, "my-secret"),
            "I3DorsRQAITp7wWwxm5u7O9Ca8T+zLwkNSN7C16z0yQ="
        );
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(base64(b"a"), "YQ==");
        let long_key = [7u8; 100];
        assert_ne!(
            hmac_sha256(&long_key, b"x"),
            hmac_sha256(&long_key[..64], b"x")
        );
    }

    #[test]
    fn messages_name_the_run() {
        let run = RunInfo {
            project: "p".into(),
            workspace: "w".into(),
            experiment: "e".into(),
            description: "d".into(),
            link: Some("https://swanlab.cn/@w/p/runs/x".into()),
        };
        let text = message(&Occasion::Error("out of memory".into()), &run);
        assert!(text.contains("encountered an error: out of memory\nProject: p\nWorkspace: w"));
        assert!(text.ends_with("Experiment Link: https://swanlab.cn/@w/p/runs/x"));
        let b = body(&text, 5, Some("s"));
        assert_eq!(b["msg_type"], "text");
        assert_eq!(b["sign"], serde_json::json!(sign(5, "s")));
        assert!(body(&text, 5, None).get("sign").is_none());
    }
}
