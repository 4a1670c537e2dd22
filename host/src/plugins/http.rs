//! HTTP requests made for plugins (the `http` host service): who may reach which host, and
//! the request itself, made with the host's TLS.

use axl_plugin_api::payload::{HttpRequest, HttpResponse};

/// The host and port a URL names (the scheme's port when none is written), read as the
/// HTTP client reads it. URLs with credentials are refused.
pub fn host_and_port(url: &str) -> Result<(String, u16), String> {
    let parsed =
        url::Url::parse(url).map_err(|e| format!("`{}` is not a URL: {e}", redact(url)))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "`{}`: the scheme is not http or https",
            redact(url)
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!(
            "`{}`: URLs with credentials are refused",
            redact(url)
        ));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("`{}` names no host", redact(url)))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| format!("`{}` has no port", redact(url)))?;
    Ok((host, port))
}

/// An `allow_net` entry as `(host, port)`: `host`, `host:port`, `[v6]` or `[v6]:port`.
fn grant(entry: &str) -> (String, Option<u16>) {
    let entry = entry.to_ascii_lowercase();
    if let Some(rest) = entry.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            return (
                host.to_string(),
                after.strip_prefix(':').and_then(|p| p.parse().ok()),
            );
        }
    }
    match entry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(port) => (host.to_string(), Some(port)),
            Err(_) => (entry.clone(), None),
        },
        _ => (entry.clone(), None),
    }
}

/// `scheme://host:port` of a URL, for messages: paths and queries may hold tokens.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}",
            u.scheme(),
            u.host_str().unwrap_or_default(),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "(an unreadable URL)".into(),
    }
}

/// Whether `grants` (`allow_net` entries: `host` for any port, `host:port` for one) let a
/// plugin reach `url`.
pub fn granted(url: &str, grants: &[String]) -> Result<(), String> {
    let (host, port) = host_and_port(url)?;
    let allowed = grants
        .iter()
        .map(|g| grant(g))
        .any(|(h, p)| h == host && p.is_none_or(|p| p == port));
    if allowed {
        Ok(())
    } else {
        let shown = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Err(format!(
            "`{shown}` is not among the hosts this plugin may reach (allow_net: [{}])",
            grants.join(", ")
        ))
    }
}

/// Makes `request`; a 4xx or 5xx status is an answer, not an error.
pub fn send(request: &HttpRequest) -> Result<HttpResponse, String> {
    // Redirects are answers: following one could leave the granted hosts.
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout_connect(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(60))
        .build();
    let mut call = agent.request(&request.method, &request.url);
    for (name, value) in &request.headers {
        call = call.set(name, value);
    }
    let answer = match &request.body {
        Some(body) => call.send_string(body),
        None => call.call(),
    };
    let response = match answer {
        Ok(response) | Err(ureq::Error::Status(_, response)) => response,
        Err(ureq::Error::Transport(e)) => {
            return Err(format!(
                "{} {}: {}",
                request.method,
                redact(&request.url),
                e.kind()
            ))
        }
    };
    let status = response.status();
    let headers = response
        .headers_names()
        .into_iter()
        .filter_map(|name| {
            let value = response.header(&name)?.to_string();
            Some((name, value))
        })
        .collect();
    let body = response.into_string().map_err(|e| {
        format!(
            "{} {}: reading the answer: {e}",
            request.method, request.url
        )
    })?;
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_name_hosts_with_or_without_a_port() {
        assert_eq!(
            host_and_port("https://api.swanlab.cn/api/login").unwrap(),
            ("api.swanlab.cn".into(), 443)
        );
        assert_eq!(
            host_and_port("http://127.0.0.1:8080/x?y").unwrap(),
            ("127.0.0.1".into(), 8080)
        );
        assert!(host_and_port("http://user@Example.org")
            .unwrap_err()
            .contains("credentials"));
        assert!(host_and_port("ftp://x").is_err());
        // The client reads a backslash as the end of the host, and so does the check.
        let (host, _) =
            host_and_port("https://attacker.example\\@api.swanlab.cn/x").unwrap_or_default();
        assert_ne!(host, "api.swanlab.cn");
        assert_eq!(
            host_and_port("http://[::1]:8080/").unwrap(),
            ("::1".into(), 8080)
        );
        assert!(granted("http://[::1]:8080/", &["[::1]:8080".to_string()]).is_ok());
        assert!(granted("http://[::1]:8081/", &["[::1]:8080".to_string()]).is_err());
        assert_eq!(
            redact("https://open.feishu.cn/open-apis/bot/v2/hook/t0ken"),
            "https://open.feishu.cn"
        );
        let grants = ["api.swanlab.cn".to_string(), "127.0.0.1:9000".to_string()];
        assert!(granted("https://api.swanlab.cn/api", &grants).is_ok());
        assert!(granted("http://127.0.0.1:9000/", &grants).is_ok());
        let err = granted("http://127.0.0.1:9001/", &grants).unwrap_err();
        assert!(err.contains("`127.0.0.1:9001` is not among"), "{err}");
        assert!(granted("https://evil.example/", &grants).is_err());
    }
}
