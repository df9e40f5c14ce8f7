//! A client of the hub's own API, for what drives it from the same machine: `sendense-hub
//! backup`, `backups` and `restore` (`cli`), and `sendense-hub demo`. Found from the hub's
//! configuration as the service reads it (`listen`, `token_file`, `api_tls`), so an operator
//! types no URL or token; JSON in and out as `serde_json::Value`, the API's shapes being the
//! contract (DESIGN.md), not a second set of types to keep in step.
//!
//! Following a job is polling its view every 100 ms with a progress line per disk at most every
//! 700 ms (the API has no push); a call that fails to connect is an error at once, as the
//! service is local.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;

/// The hub's API, from a client's side.
pub struct HubClient {
    url: String,
    token: String,
    http: reqwest::Client,
}

impl HubClient {
    /// For `url` with `token`; an `https://` URL's certificate checked against `tls_dir`'s
    /// `ca-cert.pem` (and `tls_dir`'s client certificate presented, if it holds one), or the
    /// system's roots without one.
    ///
    /// # Errors
    /// The TLS files do not load, or the HTTP client cannot be built.
    pub fn new(url: &str, token: String, tls_dir: Option<&Path>) -> anyhow::Result<Self> {
        let url = url.trim_end_matches('/').to_string();
        let http = match tls_dir {
            Some(dir) if url.starts_with("https://") => node::api::tls_dir_client(&url, dir)?,
            _ => reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build()?,
        };
        Ok(Self { url, token, http })
    }

    /// The hub that `config` (hub.toml, or the defaults without one) describes: its `listen`
    /// address (a wildcard one reached on loopback), its token file, and with `api_tls`, HTTPS
    /// with that directory's CA and client certificate. `url` replaces the address.
    ///
    /// # Errors
    /// The file does not read or parse, or the token file does not read.
    pub fn from_config(config: Option<&Path>, url: Option<&str>) -> anyhow::Result<Self> {
        let file = crate::config::read_hub_file(config).map_err(|e| anyhow!(e))?;
        let token_file = file.token_file.clone().unwrap_or_else(|| crate::config::default_dir().join("token"));
        let token = node::files::read_token(&token_file).map_err(|e| anyhow!(e))?;
        let scheme = if file.api_tls.is_some() { "https" } else { "http" };
        let url = match url {
            Some(u) => u.to_string(),
            None => format!("{scheme}://{}", reachable(file.listen.as_deref().unwrap_or("127.0.0.1:8082"))?),
        };
        Self::new(&url, token, file.api_tls.as_deref())
    }

    /// One call: the status and the JSON answer (`null` when the body is not JSON).
    ///
    /// # Errors
    /// The hub cannot be reached.
    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.with_context(|| format!("cannot reach the hub at {}", self.url))?;
        Ok((r.status().as_u16(), r.json().await.unwrap_or(Value::Null)))
    }

    /// A call that must answer `expected`; its JSON answer.
    ///
    /// # Errors
    /// The hub cannot be reached, or answered another status (its `error` said).
    pub async fn expect(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        expected: u16,
    ) -> anyhow::Result<Value> {
        let (status, v) = self.call(method, path, body).await?;
        if status != expected {
            bail!("the hub answered {status}: {}", v["error"].as_str().map_or_else(|| v.to_string(), str::to_string));
        }
        Ok(v)
    }

    /// Follow job `id` under `path` (`/api/v1/backups`...) to its end, a progress line per disk
    /// at most every 700 ms labelled `label`; the final view, whatever its status.
    ///
    /// # Errors
    /// The hub cannot be reached.
    pub async fn follow(&self, label: &str, path: &str, id: &str) -> anyhow::Result<Value> {
        let mut last_print = Instant::now().checked_sub(Duration::from_secs(10)).unwrap_or_else(Instant::now);
        loop {
            let (_, v) = self.call(reqwest::Method::GET, &format!("{path}/{id}"), None).await?;
            let state = v["status"].as_str().unwrap_or("").to_string();
            let ended = matches!(state.as_str(), "completed" | "failed" | "cancelled");
            if last_print.elapsed() >= Duration::from_millis(700) || ended {
                last_print = Instant::now();
                for d in v["disks"].as_array().into_iter().flatten() {
                    println!("{}", progress_line(label, d, &state));
                }
            }
            if ended {
                return Ok(v);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One disk's progress: percent done, rate, bytes sent, the job's state.
fn progress_line(label: &str, d: &Value, state: &str) -> String {
    let total = d["bytes_total"].as_u64().unwrap_or(0).max(1);
    let done = d["bytes_done"].as_u64().or(d["bytes_read"].as_u64()).unwrap_or(0);
    format!(
        "  {label:<12} disk {} {:>3}%  {:>10}/s  sent {:>10}  [{state}]",
        d["disk_key"],
        done.saturating_mul(100) / total,
        node::progress::human(d["rate_bps"].as_u64().unwrap_or(0)),
        node::progress::human(d["bytes_sent"].as_u64().unwrap_or(0)),
    )
}

/// The address to reach a listener on: a wildcard one on loopback, of the same family.
fn reachable(listen: &str) -> anyhow::Result<String> {
    let addr: std::net::SocketAddr = listen.parse().with_context(|| format!("bad listen address '{listen}'"))?;
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(std::net::SocketAddr::new(ip, addr.port()).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listener_is_reached_on_loopback() {
        assert_eq!(reachable("0.0.0.0:8082").unwrap(), "127.0.0.1:8082");
        assert_eq!(reachable("[::]:8082").unwrap(), "[::1]:8082");
        assert_eq!(reachable("10.0.0.1:9000").unwrap(), "10.0.0.1:9000");
        assert!(reachable("nowhere").is_err());
    }
}
