//! Helpers for black-box tests of the real binaries (`tests/tests/*.rs`):
//! locating binaries, a development PKI, relay configs and processes, the
//! netshim impairment proxy, and SDK sessions as clients.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which
//! `scripts/test` does).
#![allow(clippy::disallowed_methods)] // tests measure wall-clock time

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_core::wire::client::Role;
use relay_sdk::session::{Session, client_config};

/// Path of a workspace binary next to the running test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// A free loopback UDP port (racy, but fine for tests).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free loopback TCP port.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// App used by the tests, with its secret.
pub const APP: &str = "shop";
/// Hex secret of [`APP`].
pub const APP_SECRET_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// A token for [`APP`].
pub fn token(channel: &str, user: &str, role: Role) -> String {
    token_with(channel, user, role, 3600, &hex_secret())
}

/// The app secret as bytes.
pub fn hex_secret() -> Vec<u8> {
    (0..APP_SECRET_HEX.len() / 2)
        .map(|i| u8::from_str_radix(&APP_SECRET_HEX[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// A token with a chosen lifetime (negative: already expired) and secret.
pub fn token_with(channel: &str, user: &str, role: Role, ttl: i64, secret: &[u8]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    relay_core::token::Claims {
        app: APP.into(),
        channel: channel.into(),
        user: user.into(),
        role,
        expires: (now + ttl) as u64,
    }
    .sign(secret)
}

/// A temporary folder with a development PKI for relays `1..=n` (and
/// control-plane nodes `1..=cp`).
#[allow(missing_debug_implementations)]
pub struct Cluster {
    /// The folder.
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Creates the PKI with the real `relayd pki init`.
    pub fn new(relays: u32, control_plane: u32) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let relays: Vec<String> = (1..=relays).map(|i| i.to_string()).collect();
        let mut cmd = Command::new(bin("relayd"));
        cmd.args(["pki", "init", "--dir"])
            .arg(dir.path().join("pki"))
            .arg("--operators")
            .arg("test");
        if !relays.is_empty() {
            cmd.arg("--relays").arg(relays.join(","));
        }
        if control_plane > 0 {
            let cp: Vec<String> = (1..=control_plane).map(|i| i.to_string()).collect();
            cmd.arg("--control-plane").arg(cp.join(","));
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "pki init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Cluster { dir }
    }

    /// The PKI folder.
    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// The CA roots, for clients.
    pub fn roots(&self) -> Arc<rustls::RootCertStore> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.pki().join("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        Arc::new(roots)
    }
}

/// Settings for one relay's config file.
#[derive(Debug, Clone)]
pub struct RelaySpec {
    /// Relay id.
    pub id: u32,
    /// QUIC port.
    pub port: u16,
    /// Metrics port.
    pub metrics_port: u16,
    /// `(peer id, address)`.
    pub peers: Vec<(u32, String)>,
    /// `(to, path, backup)`.
    pub routes: Vec<(u32, Vec<u32>, Option<Vec<u32>>)>,
    /// Probe interval.
    pub probe_interval_ms: u64,
    /// Drain deadline.
    pub drain_deadline_ms: u64,
    /// Extra TOML appended verbatim.
    pub extra: String,
}

impl RelaySpec {
    /// Defaults for relay `id` on fresh ports.
    pub fn new(id: u32) -> Self {
        Self {
            id,
            port: free_udp_port(),
            metrics_port: free_tcp_port(),
            peers: Vec::new(),
            routes: Vec::new(),
            probe_interval_ms: 100,
            drain_deadline_ms: 3000,
            extra: String::new(),
        }
    }

    /// The relay's QUIC address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Where the relay serves its metrics.
    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.metrics_port))
    }

    /// The config file text.
    pub fn toml(&self, pki: &Path) -> String {
        let mut s = format!(
            r#"[relay]
id = {id}
region = "R{id}"
listen = "127.0.0.1:{port}"

[tls]
ca = "{pki}/ca.pem"
cert = "{pki}/relay-{id}.pem"
key = "{pki}/relay-{id}.key"

[metrics]
listen = "127.0.0.1:{metrics}"

[probe]
interval_ms = {probe}
fast_window_ms = {window}
recover_after_ms = 3000

[drain]
deadline_ms = {drain}

[[apps]]
id = "{APP}"
secret = "{APP_SECRET_HEX}"
"#,
            id = self.id,
            port = self.port,
            pki = pki.display(),
            metrics = self.metrics_port,
            probe = self.probe_interval_ms,
            window = (self.probe_interval_ms * 10).max(1000),
            drain = self.drain_deadline_ms,
        );
        for (id, addr) in &self.peers {
            s += &format!("\n[[peers]]\nid = {id}\naddr = \"{addr}\"\n");
        }
        for (to, path, backup) in &self.routes {
            s += &format!("\n[[routes]]\nto = {to}\npath = {path:?}\n");
            if let Some(b) = backup {
                s += &format!("backup = {b:?}\n");
            }
        }
        s += &self.extra;
        s
    }
}

/// A running child process, killed on drop; its output goes to files.
#[allow(missing_debug_implementations)]
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Its name, for messages.
    pub name: String,
    /// Where stderr goes.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr to `<dir>/<name>.log`.
    pub fn spawn(mut cmd: Command, dir: &Path, name: &str) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap();
        Proc {
            child,
            name: name.to_owned(),
            log,
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // SAFETY-free: use the kill command rather than libc.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits for exit up to `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A relay process with its spec.
#[allow(missing_debug_implementations)]
pub struct RelayProc {
    /// The spec it was started with.
    pub spec: RelaySpec,
    /// The process.
    pub proc: Proc,
}

impl RelayProc {
    /// Writes the config and starts `relayd`, waiting until its metrics
    /// endpoint answers.
    pub fn start(cluster: &Cluster, spec: RelaySpec) -> RelayProc {
        let config = cluster.dir.path().join(format!("relay-{}.toml", spec.id));
        std::fs::write(&config, spec.toml(&cluster.pki())).unwrap();
        let mut cmd = Command::new(bin("relayd"));
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", "relayd=debug,info");
        let proc = Proc::spawn(cmd, cluster.dir.path(), &format!("relay-{}", spec.id));
        let r = RelayProc { spec, proc };
        let end = Instant::now() + Duration::from_secs(10);
        while r.scrape().is_none() {
            assert!(
                Instant::now() < end,
                "relay {} did not start:\n{}",
                r.spec.id,
                r.proc.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    /// The metrics page, if the endpoint answers.
    pub fn scrape(&self) -> Option<String> {
        http_get(self.spec.metrics_addr(), "/metrics")
    }

    /// Sum of a metric's samples whose label set contains `labels`.
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let page = self.scrape().unwrap_or_default();
        metric_value(&page, name, labels)
    }
}

/// Sums a Prometheus text page's samples of `name` whose labels contain
/// `labels` (e.g. `peer="3"`; empty matches all).
pub fn metric_value(page: &str, name: &str, labels: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A minimal HTTP GET (the tests avoid an HTTP client dependency).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body).ok()?;
    let (head, rest) = body.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| rest.to_owned())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| rest.to_owned()))
}

/// A netshim process.
#[allow(missing_debug_implementations)]
pub struct Shim {
    /// The process.
    pub proc: Proc,
    /// Bound address per link.
    pub links: std::collections::HashMap<String, SocketAddr>,
    /// Control port.
    pub control: SocketAddr,
}

impl Shim {
    /// Starts netshim with `(name, target)` links on fresh ports.
    pub fn start(dir: &Path, links: &[(&str, SocketAddr)]) -> Shim {
        let mut cmd = Command::new(bin("netshim"));
        for (name, target) in links {
            cmd.arg("--link")
                .arg(format!("{name},127.0.0.1:0,{target}"));
        }
        let log = dir.join("netshim.log");
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).expect("netshim prints its addresses");
        let links = v["links"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, a)| (k.clone(), a.as_str().unwrap().parse().unwrap()))
            .collect();
        let control = v["control"].as_str().unwrap().parse().unwrap();
        Shim {
            proc: Proc {
                child,
                name: "netshim".into(),
                log,
            },
            links,
            control,
        }
    }

    /// Sends a control command; returns the reply line.
    pub fn command(&self, cmd: &str) -> String {
        let mut s = TcpStream::connect(self.control).unwrap();
        writeln!(s, "{cmd}").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        line.trim().to_owned()
    }
}

/// A client endpoint and config trusting the cluster CA.
pub fn client_endpoint(cluster: &Cluster) -> (quinn::Endpoint, quinn::ClientConfig) {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    (endpoint, client_config(cluster.roots()).unwrap())
}

/// Connects an SDK session to a relay.
pub async fn session(cluster: &Cluster, addr: SocketAddr) -> Session {
    session_trusting(cluster.roots(), addr).await
}

/// Connects an SDK session to a relay whose certificate `roots` sign
/// (for sessions on threads that cannot borrow the [`Cluster`]).
pub async fn session_trusting(roots: Arc<rustls::RootCertStore>, addr: SocketAddr) -> Session {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let config = client_config(roots).unwrap();
    Session::connect(&endpoint, config, addr, "localhost", Duration::from_secs(5))
        .await
        .expect("session connects")
}

/// Settings of one control-plane node's config file.
#[derive(Debug, Clone)]
pub struct CpSpec {
    /// Raft id.
    pub id: u64,
    /// QUIC port.
    pub port: u16,
    /// HTTP (metrics) port.
    pub http_port: u16,
    /// `(id, address)` of every member as this node dials it.
    pub members: Vec<(u64, String)>,
    /// Start empty and wait to be added.
    pub join: bool,
}

impl CpSpec {
    /// Node `id` on fresh ports (members filled by the caller).
    pub fn new(id: u64) -> Self {
        Self {
            id,
            port: free_udp_port(),
            http_port: free_tcp_port(),
            members: Vec::new(),
            join: false,
        }
    }

    /// The node's API address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The config text.
    pub fn toml(&self, pki: &Path, data: &Path) -> String {
        let members: Vec<String> = self
            .members
            .iter()
            .map(|(id, a)| format!("{{ id = {id}, addr = \"{a}\" }}"))
            .collect();
        format!(
            r#"[node]
id = {id}
listen = "127.0.0.1:{port}"
data_dir = "{data}"
http_listen = "127.0.0.1:{http}"

[tls]
ca = "{pki}/ca.pem"
cert = "{pki}/cp-{id}.pem"
key = "{pki}/cp-{id}.key"

[raft]
heartbeat_ms = 100
election_ms = 1000

[routing]
epoch_interval_ms = 500

[cluster]
members = [{members}]
join = {join}

[[apps]]
id = "{APP}"
secret = "{APP_SECRET_HEX}"
"#,
            id = self.id,
            port = self.port,
            http = self.http_port,
            data = data.display(),
            pki = pki.display(),
            members = members.join(", "),
            join = self.join,
        )
    }
}

/// A control-plane node process.
#[allow(missing_debug_implementations)]
pub struct CpProc {
    /// Its spec.
    pub spec: CpSpec,
    /// The process (None while stopped).
    pub proc: Option<Proc>,
    config: PathBuf,
    dir: PathBuf,
}

impl CpProc {
    /// Writes the config and starts the node.
    pub fn start(cluster: &Cluster, spec: CpSpec) -> CpProc {
        let dir = cluster.dir.path().to_owned();
        let data = dir.join(format!("cp-{}-data", spec.id));
        let config = dir.join(format!("cp-{}.toml", spec.id));
        std::fs::write(&config, spec.toml(&cluster.pki(), &data)).unwrap();
        let mut c = CpProc {
            spec,
            proc: None,
            config,
            dir,
        };
        c.restart();
        c
    }

    /// Starts the process again (same config and data).
    pub fn restart(&mut self) {
        let mut cmd = Command::new(bin("controlplane"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "controlplane=debug,raft=info,info");
        self.proc = Some(Proc::spawn(cmd, &self.dir, &format!("cp-{}", self.spec.id)));
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// The node's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("cp-{}.log", self.spec.id)))
            .unwrap_or_default()
    }
}

/// The operator identity of the test cluster.
pub fn operator(cluster: &Cluster) -> relay_net::tls::TlsIdentity {
    let pki = cluster.pki();
    relay_net::tls::TlsIdentity::load(
        &pki.join("ca.pem"),
        &pki.join("operator-test.pem"),
        &pki.join("operator-test.key"),
        "relays.internal",
    )
    .unwrap()
}

/// One request to a node; errors become `Response::Error`.
pub async fn cp_request(
    identity: &relay_net::tls::TlsIdentity,
    addr: SocketAddr,
    req: &controlplane::api::Request,
    timeout: Duration,
) -> controlplane::api::Response {
    use controlplane::api::Response;
    use controlplane::client::{CpClient, NodeAddr};
    let node = NodeAddr { id: None, addr };
    let fut = async {
        let c = CpClient::connect(&node, identity).await?;
        c.request(req).await
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Response::Error {
            message: e.to_string(),
        },
        Err(_) => Response::Error {
            message: "timeout".into(),
        },
    }
}

/// The status of a node, if it answers.
pub async fn cp_status(
    identity: &relay_net::tls::TlsIdentity,
    addr: SocketAddr,
) -> Option<controlplane::api::ClusterStatus> {
    match cp_request(
        identity,
        addr,
        &controlplane::api::Request::Status,
        Duration::from_secs(1),
    )
    .await
    {
        controlplane::api::Response::Status(s) => Some(s),
        _ => None,
    }
}

/// A real DNS server (hickory-server) on a loopback UDP port, serving one
/// zone from a zone file.
#[allow(missing_debug_implementations)]
pub struct DnsServer {
    /// Where it answers.
    pub addr: SocketAddr,
    server: hickory_server::Server<hickory_server::zone_handler::Catalog>,
}

impl DnsServer {
    /// Serves `records` (zone-file lines relative to `origin`, e.g.
    /// `relays.internal.`) with a generated SOA. The zone file goes to `dir`.
    pub async fn start(dir: &Path, origin: &str, records: &str) -> DnsServer {
        use hickory_server::proto::rr::{LowerName, Name};
        use hickory_server::store::file::{FileConfig, FileZoneHandler};
        use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
        use std::str::FromStr;

        let zone_path = dir.join("zone.db");
        let text = format!(
            "$ORIGIN {origin}\n$TTL 60\n@ IN SOA ns.{origin} hostmaster.{origin} 1 3600 600 86400 60\n{records}\n"
        );
        std::fs::write(&zone_path, text).unwrap();
        let name = Name::from_str(origin).unwrap();
        let handler = FileZoneHandler::try_from_config(
            name.clone(),
            ZoneType::Primary,
            AxfrPolicy::Deny,
            None,
            &FileConfig { zone_path },
        )
        .expect("zone loads");
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&name), vec![Arc::new(handler)]);
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let mut server = hickory_server::Server::new(catalog);
        server.register_socket(socket);
        DnsServer { addr, server }
    }

    /// Stops answering (the port closes).
    pub async fn stop(mut self) {
        let _ = self.server.shutdown_gracefully().await;
    }
}

/// Writes a GeoIP City database mapping each network to `(lat, lon,
/// country)`, in the GeoLite2 layout.
pub fn write_geoip(path: &Path, entries: &[(&str, f64, f64, &str)]) {
    let mut w = mmdb_writer::Writer::new("GeoLite2-City");
    for (net, lat, lon, country) in entries {
        let record = serde_json::json!({
            "country": {"iso_code": country},
            "location": {"latitude": lat, "longitude": lon},
        });
        w.insert(net.parse::<ipnet::IpNet>().unwrap(), &record)
            .unwrap();
    }
    std::fs::write(path, w.to_bytes().unwrap()).unwrap();
}
