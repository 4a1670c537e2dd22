//! SwanLab's cloud API, as its Python SDK speaks it, over the host's `http` service:
//!
//! 1. `POST /api/login/api_key` with the key in `authorization` gives a session id (`sid`),
//!    sent as a cookie from then on, and the user's name;
//! 2. `GET /api/project/{workspace}/{project}`, created by `POST /api/projects/{workspace}`
//!    when missing;
//! 3. `POST /api/project/{workspace}/{project}/experiment` creates the run;
//! 4. `PUT …/runs/{id}/profile` records the hyperparameters, once;
//! 5. each new metric is declared (`POST /api/projects/{workspace}/{project}/series`, or
//!    `POST /api/experiment/{id}/columns` on older projects), and values go to
//!    `POST /api/house/metrics` by step;
//! 6. `PUT …/runs/{id}/state` ends the run, `FINISHED` or `CRASHED`.
//!
//! The API key travels only in the login request's header; no message carries it.

use std::collections::BTreeSet;

use axl_sdk::prelude::*;

/// The protocol level implemented: the SwanLab SDK version whose requests these are.
const SDK_VERSION: &str = "0.10.3";

/// A run on a SwanLab server.
#[derive(Debug)]
pub struct CloudRun {
    api: String,
    sid: String,
    /// The workspace (user or organization).
    pub workspace: String,
    /// The project.
    pub project: String,
    project_id: String,
    project_version: i64,
    experiment_id: String,
    /// The run's page.
    pub link: String,
    declared: BTreeSet<String>,
}

/// What a call returned, parsed.
fn call(
    host: &mut dyn Host,
    method: &str,
    url: &str,
    headers: Vec<(String, String)>,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value), PluginError> {
    let mut headers = headers;
    headers.push(("X-SwanLab-SDK-Version".into(), SDK_VERSION.into()));
    if body.is_some() {
        headers.push(("Content-Type".into(), "application/json".into()));
    }
    let response = host.http(&HttpRequest {
        method: method.into(),
        url: url.into(),
        headers,
        body: body.map(|b| b.to_string()),
    })?;
    let json = serde_json::from_str(&response.body).unwrap_or(serde_json::Value::Null);
    Ok((response.status, json))
}

/// A name as one segment of a URL path (everything but unreserved characters escaped).
fn segment(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn failed(what: &str, status: u16, answer: &serde_json::Value) -> PluginError {
    let detail = answer
        .get("message")
        .and_then(|m| m.as_str())
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    PluginError::new(format!("SwanLab {what} failed (HTTP {status}){detail}"))
}

/// What a new run is.
pub struct NewRun<'a> {
    /// `swanlab_api_host`, without a path.
    pub api_host: &'a str,
    /// `swanlab_web_host`.
    pub web_host: &'a str,
    /// The API key.
    pub api_key: &'a str,
    /// `swanlab_workspace`, else the user's own.
    pub workspace: Option<&'a str>,
    /// `swanlab_project`.
    pub project: &'a str,
    /// The experiment's name.
    pub experiment: &'a str,
    /// `swanlab_description`.
    pub description: &'a str,
    /// The client's id for the run.
    pub run_id: &'a str,
    /// When it was created (ISO 8601, UTC).
    pub created_at: &'a str,
}

impl CloudRun {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api)
    }

    fn session(&self) -> Vec<(String, String)> {
        vec![("Cookie".into(), format!("sid={}", self.sid))]
    }

    /// Logs in and creates the run (and the project, when it does not exist yet).
    pub fn start(run: &NewRun<'_>, host: &mut dyn Host) -> Result<Self, PluginError> {
        let api = format!("{}/api", run.api_host.trim_end_matches('/'));
        let (status, login) = call(
            host,
            "POST",
            &format!("{api}/login/api_key"),
            vec![("authorization".into(), run.api_key.into())],
            None,
        )?;
        if status != 200 && status != 201 {
            return Err(failed(
                "login (check swanlab_api_key or SWANLAB_API_KEY)",
                status,
                &login,
            ));
        }
        let sid = login["sid"].as_str().unwrap_or_default().to_string();
        let username = login["userInfo"]["username"].as_str().unwrap_or_default();
        let workspace = run.workspace.unwrap_or(username).to_string();
        let mut this = Self {
            api,
            sid,
            workspace,
            project: run.project.to_string(),
            project_id: String::new(),
            project_version: 0,
            experiment_id: String::new(),
            link: String::new(),
            declared: BTreeSet::new(),
        };
        let project_path = format!(
            "/project/{}/{}",
            segment(&this.workspace),
            segment(&this.project)
        );
        let (mut status, mut project) =
            call(host, "GET", &this.url(&project_path), this.session(), None)?;
        if status == 404 {
            let (created, answer) = call(
                host,
                "POST",
                &this.url(&format!("/projects/{}", segment(&this.workspace))),
                this.session(),
                Some(json!({"name": this.project, "visibility": "PRIVATE"})),
            )?;
            if created != 200 && created != 201 {
                return Err(failed("project creation", created, &answer));
            }
            (status, project) = call(host, "GET", &this.url(&project_path), this.session(), None)?;
        }
        if status != 200 {
            return Err(failed("project lookup", status, &project));
        }
        this.project_id = project["cuid"].as_str().unwrap_or_default().to_string();
        this.project_version = project["version"].as_i64().unwrap_or(0);
        let mut experiment = json!({
            "name": run.experiment,
            "createdAt": run.created_at,
            "colors": ["#528d59", "#528d59"],
            "cuid": run.run_id,
        });
        if !run.description.is_empty() {
            experiment["description"] = json!(run.description);
        }
        let (status, created) = call(
            host,
            "POST",
            &this.url(&format!("{project_path}/experiment")),
            this.session(),
            Some(experiment),
        )?;
        if status != 200 && status != 201 {
            return Err(failed("experiment creation", status, &created));
        }
        this.experiment_id = created["cuid"].as_str().unwrap_or(run.run_id).to_string();
        let slug = created["slug"]
            .as_str()
            .unwrap_or(&this.experiment_id)
            .to_string();
        this.link = format!(
            "{}/@{}/{}/runs/{slug}",
            run.web_host.trim_end_matches('/'),
            this.workspace,
            this.project
        );
        Ok(this)
    }

    fn run_path(&self, what: &str) -> String {
        self.url(&format!(
            "/project/{}/{}/runs/{}/{what}",
            segment(&self.workspace),
            segment(&self.project),
            segment(&self.experiment_id)
        ))
    }

    /// Records the hyperparameters (SwanLab's `{key: {value, desc, sort}}`).
    pub fn config(
        &mut self,
        config: &serde_json::Map<String, serde_json::Value>,
        host: &mut dyn Host,
    ) -> Result<(), PluginError> {
        let profile: serde_json::Map<String, serde_json::Value> = config
            .iter()
            .enumerate()
            .map(|(sort, (k, v))| (k.clone(), json!({"value": v, "desc": "", "sort": sort})))
            .collect();
        let (status, answer) = call(
            host,
            "PUT",
            &self.run_path("profile"),
            self.session(),
            Some(json!({"config": profile})),
        )?;
        if status >= 300 {
            return Err(failed("config upload", status, &answer));
        }
        Ok(())
    }

    /// Uploads the values of one step, declaring metrics the run has not had yet.
    pub fn log(
        &mut self,
        step: u64,
        metrics: &[(String, f64)],
        created_at: &str,
        host: &mut dyn Host,
    ) -> Result<(), PluginError> {
        let new: Vec<&String> = metrics
            .iter()
            .map(|(k, _)| k)
            .filter(|k| !self.declared.contains(*k))
            .collect();
        if !new.is_empty() {
            let column = |k: &str| {
                let section = k.split_once('/').map(|(s, _)| s);
                let mut c = json!({"key": k, "type": "FLOAT"});
                if let Some(section) = section {
                    c["sectionName"] = json!(section);
                }
                c
            };
            let columns: Vec<serde_json::Value> = new.iter().map(|k| column(k)).collect();
            let (url, body) = if self.project_version == 1 {
                (
                    self.url(&format!(
                        "/projects/{}/{}/series",
                        segment(&self.workspace),
                        segment(&self.project)
                    )),
                    json!({"series": columns}),
                )
            } else {
                (
                    self.url(&format!(
                        "/experiment/{}/columns",
                        segment(&self.experiment_id)
                    )),
                    json!(columns),
                )
            };
            let (status, answer) = call(host, "POST", &url, self.session(), Some(body))?;
            if status >= 300 {
                return Err(failed("metric declaration", status, &answer));
            }
            self.declared.extend(new.into_iter().cloned());
        }
        let values: Vec<serde_json::Value> = metrics
            .iter()
            .map(|(key, value)| {
                let data = if value.is_finite() {
                    json!(value)
                } else {
                    json!("nan")
                };
                json!({"key": key, "index": step, "data": data, "create_time": created_at})
            })
            .collect();
        let body = json!({
            "type": "scalar",
            "projectId": self.project_id,
            "experimentId": self.experiment_id,
            "metrics": values,
        });
        let (status, answer) = call(
            host,
            "POST",
            &self.url("/house/metrics"),
            self.session(),
            Some(body),
        )?;
        if status >= 300 {
            return Err(failed("metric upload", status, &answer));
        }
        Ok(())
    }

    /// Ends the run: `FINISHED` or `CRASHED`.
    pub fn finish(
        &mut self,
        state: &str,
        finished_at: &str,
        host: &mut dyn Host,
    ) -> Result<(), PluginError> {
        let body = json!({"state": state, "finishedAt": finished_at, "from": "sdk"});
        let (status, answer) = call(
            host,
            "PUT",
            &self.run_path("state"),
            self.session(),
            Some(body),
        )?;
        if status >= 300 {
            return Err(failed("finishing the run", status, &answer));
        }
        Ok(())
    }
}
