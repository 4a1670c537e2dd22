//! HTTP requests made for plugins (the `http` host service): who may reach which host, and
//! the request itself, made with the host's TLS.

use axl_plugin_api::payload::{HttpRequest, HttpResponse};

/// The host and port a URL names (the scheme's port when none is written).
pub fn host_and_port(url: &str) -> Result<(String, u16), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("`{url}` is not an http:// or https:// URL"))?;
    let default_port = match scheme {
        "http" => 80,
        "https" => 443,
        other => {
            return Err(format!(
                "`{url}`: the scheme `{other}` is not http or https"
            ))
        }
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            match port.parse() {
                Ok(port) => (host, port),
                Err(_) => (authority, default_port),
            }
        }
        _ => (authority, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("`{url}` names no host"));
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// Whether `grants` (`allow_net` entries: `host` for any port, `host:port` for one) let a
/// plugin reach `url`.
pub fn granted(url: &str, grants: &[String]) -> Result<(), String> {
    let (host, port) = host_and_port(url)?;
    let allowed = grants.iter().any(|g| {
        let g = g.to_ascii_lowercase();
        g == host || g == format!("{host}:{port}")
    });
    if allowed {
        Ok(())
    } else {
        Err(format!(
            "`{host}:{port}` is not among the hosts this plugin may reach (allow_net: [{}])",
            grants.join(", ")
        ))
    }
}

/// Makes `request`; a 4xx or 5xx status is an answer, not an error.
pub fn send(request: &HttpRequest) -> Result<HttpResponse, String> {
    let agent = ureq::AgentBuilder::new()
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
            return Err(format!("{} {}: {e}", request.method, request.url))
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
        assert_eq!(
            host_and_port("http://user@Example.org").unwrap(),
            ("example.org".into(), 80)
        );
        assert!(host_and_port("ftp://x").is_err());
        let grants = ["api.swanlab.cn".to_string(), "127.0.0.1:9000".to_string()];
        assert!(granted("https://api.swanlab.cn/api", &grants).is_ok());
        assert!(granted("http://127.0.0.1:9000/", &grants).is_ok());
        let err = granted("http://127.0.0.1:9001/", &grants).unwrap_err();
        assert!(err.contains("`127.0.0.1:9001` is not among"), "{err}");
        assert!(granted("https://evil.example/", &grants).is_err());
    }
}
