//! Commands that act on the gateway's state: `serve`, and the node commands
//! that go through a running gateway's admin API, or open the data
//! directory themselves when none is running.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::progress::Bar;
use super::{GlobalArgs, Reply};
use anyhow::{Context, Result};
use clap::Args;
use gateway::app::App;
use gateway::config::{default_data_dir, Config, UpstreamConfig};
use gateway::http::admin::{AdminRequest, Client};
use gateway::store::ipfs::dht::DhtMode;
use gateway::util::progress::Meter;

/// `nixpfs serve` options; each also a config key.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// HTTP address for Nix (config `listen`).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// libp2p listen multiaddr; repeat for more (config `ipfs_listen`).
    #[arg(long = "ipfs-listen")]
    pub ipfs_listen: Vec<String>,
    /// Peer multiaddr ending in /p2p/<id>; repeat (config `peers`).
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// The anchor registry: file path or http(s) URL (config `registry`).
    #[arg(long)]
    pub registry: Option<String>,
    /// A trust-root key (`name:base64`) the first registry must be signed
    /// by; repeat (config `registry_root_keys`).
    #[arg(long = "registry-root-key", value_parser = parse_public_key)]
    pub registry_root_keys: Vec<anchor_registry::PublicKey>,
    /// How many trust-root keys must have signed it (config `registry_threshold`).
    #[arg(long)]
    pub registry_threshold: Option<u64>,
    /// Distinct registry anchors that must agree (config `require`).
    #[arg(long)]
    pub require: Option<u32>,
    /// Only these registry anchors count; repeat (config `anchors`).
    #[arg(long = "anchor")]
    pub anchors: Vec<String>,
    /// Token file for uploads (config `upload_token_file`).
    #[arg(long)]
    pub upload_token_file: Option<PathBuf>,
    /// Uploaded narinfos must be signed by this key; repeat (config `upload_require_sig`).
    #[arg(long = "upload-require-sig")]
    pub upload_require_sig: Vec<String>,
    /// Seconds between anchor syncs, 0 = only at start (config `sync_interval_secs`).
    #[arg(long)]
    pub sync_interval: Option<u64>,
    /// Pin what was fetched for Nix, to seed it (config `seed_fetched`).
    #[arg(long)]
    pub seed_fetched: bool,
    /// Re-hash blocks rebuilt from pinned store paths on every read
    /// (config `store_blocks_rehash`).
    #[arg(long)]
    pub store_blocks_rehash: bool,
    /// Priority in nix-cache-info (config `priority`).
    #[arg(long)]
    pub priority: Option<u32>,
    /// WantMassQuery in nix-cache-info: `true` or `false` (config `want_mass_query`).
    #[arg(long)]
    pub want_mass_query: Option<bool>,
    /// Seconds to wait for a block nobody has (config `fetch_timeout_secs`).
    #[arg(long = "fetch-timeout")]
    pub fetch_timeout_secs: Option<u64>,
    /// The gateway's narinfo signing key (config `signing_key_file`).
    #[arg(long)]
    pub signing_key_file: Option<PathBuf>,
    /// Kademlia DHT: off, client or server (config `dht`).
    #[arg(long)]
    pub dht: Option<DhtMode>,
    /// DHT protocol, e.g. /ipfs/lan/kad/1.0.0 (config `dht_protocol`).
    #[arg(long)]
    pub dht_protocol: Option<String>,
    /// DHT bootstrap peer ending in /p2p/<id>; repeat (config `bootstrap`).
    #[arg(long = "bootstrap")]
    pub bootstrap: Vec<String>,
    /// Routing V1 endpoint (http://host:port) asked for providers; repeat
    /// (config `routers`).
    #[arg(long = "router")]
    pub routers: Vec<String>,
    /// An upstream binary cache and the keys whose signatures make its
    /// paths servable, as `URL=KEY[,KEY…]`; repeat (config `[[upstreams]]`).
    #[arg(long = "upstream", value_parser = parse_upstream)]
    pub upstreams: Vec<UpstreamConfig>,
    /// Fetch upstream-signed NARs from peer gateways before the upstream:
    /// `true` or `false` (config `prefer_peers`).
    #[arg(long)]
    pub prefer_peers: Option<bool>,
    /// Budget for pins made by seeding, e.g. `50G` (config `cache_max_size`).
    #[arg(long)]
    pub cache_max_size: Option<String>,
    /// Fetch upstream NARs up to this size once their narinfo is served,
    /// e.g. `4M`, `0` for none (config `upstream_prefetch_max`).
    #[arg(long)]
    pub upstream_prefetch_max: Option<String>,
    /// HTTP connections served at once (config `http_max_connections`).
    #[arg(long)]
    pub http_max_connections: Option<usize>,
    /// Seconds an HTTP connection may wait with no request (config
    /// `http_idle_timeout_secs`).
    #[arg(long = "http-idle-timeout")]
    pub http_idle_timeout_secs: Option<u64>,
    /// Seconds a client may take to send a request header (config
    /// `http_header_timeout_secs`).
    #[arg(long = "http-header-timeout")]
    pub http_header_timeout_secs: Option<u64>,
    /// Seconds a client may accept no byte of a response (config
    /// `http_send_timeout_secs`).
    #[arg(long = "http-send-timeout")]
    pub http_send_timeout_secs: Option<u64>,
}

impl ServeArgs {
    fn apply(self, config: &mut Config) {
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if !self.ipfs_listen.is_empty() {
            config.ipfs_listen = self.ipfs_listen;
        }
        if !self.peers.is_empty() {
            config.peers = self.peers;
        }
        if let Some(dht) = self.dht {
            config.dht = dht;
        }
        if let Some(protocol) = self.dht_protocol {
            config.dht_protocol = protocol;
        }
        if !self.bootstrap.is_empty() {
            config.bootstrap = self.bootstrap;
        }
        if !self.routers.is_empty() {
            config.routers = self.routers;
        }
        if !self.upstreams.is_empty() {
            config.upstreams = self.upstreams;
        }
        if let Some(prefer) = self.prefer_peers {
            config.prefer_peers = prefer;
        }
        if self.cache_max_size.is_some() {
            config.cache_max_size = self.cache_max_size;
        }
        if let Some(max) = self.upstream_prefetch_max {
            config.upstream_prefetch_max = max;
        }
        if self.registry.is_some() {
            config.registry = self.registry;
        }
        if !self.registry_root_keys.is_empty() {
            config.registry_root_keys = self.registry_root_keys;
        }
        if let Some(threshold) = self.registry_threshold {
            config.registry_threshold = threshold;
        }
        if let Some(require) = self.require {
            config.require = require;
        }
        if !self.anchors.is_empty() {
            config.anchors = self.anchors;
        }
        if self.upload_token_file.is_some() {
            config.upload_token_file = self.upload_token_file;
        }
        if !self.upload_require_sig.is_empty() {
            config.upload_require_sig = self.upload_require_sig;
        }
        if let Some(interval) = self.sync_interval {
            config.sync_interval_secs = interval;
        }
        if self.seed_fetched {
            config.seed_fetched = true;
        }
        if self.store_blocks_rehash {
            config.store_blocks_rehash = true;
        }
        if let Some(priority) = self.priority {
            config.priority = priority;
        }
        if let Some(want) = self.want_mass_query {
            config.want_mass_query = want;
        }
        if let Some(secs) = self.fetch_timeout_secs {
            config.fetch_timeout_secs = secs;
        }
        if self.signing_key_file.is_some() {
            config.signing_key_file = self.signing_key_file;
        }
        if let Some(n) = self.http_max_connections {
            config.http_max_connections = n;
        }
        if let Some(secs) = self.http_idle_timeout_secs {
            config.http_idle_timeout_secs = secs;
        }
        if let Some(secs) = self.http_header_timeout_secs {
            config.http_header_timeout_secs = secs;
        }
        if let Some(secs) = self.http_send_timeout_secs {
            config.http_send_timeout_secs = secs;
        }
    }
}

/// `URL=KEY[,KEY…]`: the URL and keys are checked with the rest of the
/// configuration, which names what is wrong.
fn parse_upstream(text: &str) -> Result<UpstreamConfig, String> {
    let (url, keys) = text
        .split_once('=')
        .ok_or("expected URL=KEY[,KEY…], e.g. https://cache.nixos.org=cache.nixos.org-1:6NCH…")?;
    Ok(UpstreamConfig {
        url: url.to_owned(),
        keys: keys
            .split(',')
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect(),
        priority: None,
    })
}

fn parse_public_key(text: &str) -> Result<anchor_registry::PublicKey, String> {
    anchor_registry::PublicKey::parse(text).map_err(|e| e.to_string())
}

/// The data directory and configuration every command starts from.
pub fn resolve(global: &GlobalArgs) -> Result<(PathBuf, Config)> {
    let data_dir = global.data_dir.clone().unwrap_or_else(default_data_dir);
    let (path, explicit) = match &global.config {
        Some(path) => (path.clone(), true),
        None => (data_dir.join("config.toml"), false),
    };
    let config = Config::load(&path, explicit)?;
    Ok((data_dir, config))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("while starting the async runtime")
}

/// `nixpfs serve`.
pub fn serve(global: &GlobalArgs, args: ServeArgs) -> Result<()> {
    let (data_dir, mut config) = resolve(global)?;
    args.apply(&mut config);
    runtime()?.block_on(gateway::app::serve::serve(&data_dir, config))
}

/// Runs a node command through the running gateway, or directly; a long
/// one draws a progress bar (see [`super::progress`]).
pub fn dispatch(global: &GlobalArgs, request: AdminRequest) -> Result<Reply> {
    let op = Reply::op_name(&request);
    let (data_dir, mut config) = resolve(global)?;
    let mut bar = if runs_long(&request) {
        Bar::new(global.progress)
    } else {
        None
    };
    if let Some(client) = Client::discover(&data_dir)? {
        let value = match bar.as_mut() {
            Some(bar) => client.call_watching(&request, |p| bar.update(p)),
            None => client.call(&request),
        };
        return finish(bar, value).map(|value| Reply::new(op, value));
    }
    // Direct mode: no need to listen for peers on a port of our own.
    config.ipfs_listen = vec!["/ip4/127.0.0.1/tcp/0".to_owned()];
    let meter = Meter::new();
    let drawing = bar.map(|bar| draw_while_running(bar, meter.clone()));
    let value = runtime()?.block_on(async {
        let app = App::open(&data_dir, config).await?;
        let result = app.execute_counted(request, &meter).await;
        app.shutdown().await;
        anyhow::Ok(result?)
    });
    let bar = drawing.and_then(|(stop, thread)| {
        let _ = stop.send(());
        thread.join().ok()
    });
    finish(bar, value).map(|value| Reply::new(op, value))
}

/// Requests that can take longer than a second: the ones with a bar.
fn runs_long(request: &AdminRequest) -> bool {
    matches!(
        request,
        AdminRequest::Pin { .. }
            | AdminRequest::Add { .. }
            | AdminRequest::Fetch { .. }
            | AdminRequest::CarExport { .. }
            | AdminRequest::CarImport { .. }
            | AdminRequest::Sync
            | AdminRequest::RepoVerify
            | AdminRequest::Seed { .. }
            | AdminRequest::AnchorSign { .. }
            | AdminRequest::Contribute { .. }
            | AdminRequest::AnchorRebuild { .. }
    )
}

/// Redraws `bar` from `meter` ten times a second on a thread of its own,
/// until told to stop; the thread hands the bar back.
fn draw_while_running(
    mut bar: Bar,
    meter: Meter,
) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<Bar>) {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            stopped.recv_timeout(std::time::Duration::from_millis(100))
        {
            bar.update(meter.snapshot());
        }
        bar.update(meter.snapshot());
        bar
    });
    (stop, thread)
}

/// Ends the bar: its summary line when the command succeeded, just gone
/// when it failed (the error says what happened).
fn finish<T>(bar: Option<Bar>, value: Result<T>) -> Result<T> {
    if let Some(bar) = bar {
        if value.is_ok() {
            bar.finish();
        } else {
            bar.abandon();
        }
    }
    value
}

/// `nixpfs nix-config`: the nix.conf lines that make Nix use this gateway.
pub fn nix_config(global: &GlobalArgs) -> Result<()> {
    let (data_dir, config) = resolve(global)?;
    std::fs::create_dir_all(&data_dir)?;
    let key = gateway::app::gateway_key(&data_dir, &config)?;
    println!("# nixpfs gateway at {}", data_dir.display());
    println!("extra-substituters = http://{}", config.listen);
    println!("extra-trusted-public-keys = {}", key.public());
    Ok(())
}

/// Makes a user-given path absolute: the gateway may run in another directory.
pub fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("invalid path {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_flags_become_config_entries_the_config_checks() {
        let key = "cache-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
        let up = parse_upstream(&format!("http://127.0.0.1:9/c={key},{key}")).unwrap();
        assert_eq!(up.url, "http://127.0.0.1:9/c");
        assert_eq!(up.keys, vec![key.to_owned(), key.to_owned()]);
        assert!(parse_upstream("http://127.0.0.1:9/c")
            .unwrap_err()
            .contains("URL=KEY"));
        let config = Config {
            upstreams: vec![parse_upstream("ftp://x=").unwrap()],
            ..Config::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("ftp://x"), "{err}");
    }
}
