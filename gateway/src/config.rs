//! Gateway configuration: one TOML file, every key also a `serve` flag, a sane
//! default for each. Flags override the file; the file overrides defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anchor_registry::{PublicKey, RegistryError, TrustRoot};
use serde::Deserialize;

use crate::store::ipfs::dht::{DhtMode, DEFAULT_PROTOCOL};

/// Port the gateway listens on when nothing else is configured.
pub const DEFAULT_PORT: u16 = 8480;

/// Everything `nixpfs serve` needs to know, after merging file and flags.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP address for Nix. Loopback by default. The admin API is never
    /// served here, only on the data directory's Unix socket.
    pub listen: SocketAddr,
    /// libp2p listen multiaddrs of the embedded IPFS node.
    pub ipfs_listen: Vec<String>,
    /// Peers to dial and keep connected (multiaddrs ending in `/p2p/<id>`).
    pub peers: Vec<String>,
    /// The signed anchor registry: a file path or an http(s) URL.
    pub registry: Option<String>,
    /// The trust root: public keys (`name:base64`, as `nixpfs registry init`
    /// prints them) of which `registry_threshold` must have signed the
    /// first registry this gateway accepts. Required with `registry`.
    pub registry_root_keys: Vec<PublicKey>,
    /// How many of `registry_root_keys` must have signed the first registry.
    pub registry_threshold: u64,
    /// How many distinct registry anchors must agree before a path is served.
    pub require: u32,
    /// Only these registry anchors count (all of the registry's when empty).
    pub anchors: Vec<String>,
    /// File holding the token that authorises uploads and admin writes.
    pub upload_token_file: Option<PathBuf>,
    /// Public keys (`name:base64`) of which an uploaded narinfo must carry a
    /// valid signature by at least one; empty: any authorised upload.
    pub upload_require_sig: Vec<String>,
    /// `Priority:` in `nix-cache-info` (lower is preferred by Nix).
    pub priority: u32,
    /// `WantMassQuery:` in `nix-cache-info`.
    pub want_mass_query: bool,
    /// Seconds between two anchor syncs while serving; 0 disables the timer.
    pub sync_interval_secs: u64,
    /// Pin what the gateway fetched for Nix, so it seeds it to others.
    pub seed_fetched: bool,
    /// Seconds to wait for a block nobody has before giving up.
    pub fetch_timeout_secs: u64,
    /// Re-hash every block rebuilt from a pinned store path on each read,
    /// beside the check that its files are unchanged since the pin.
    pub store_blocks_rehash: bool,
    /// The Kademlia DHT: `off` (only `peers` are asked), `client` (ask the
    /// DHT for providers, provide what we seed) or `server` (also store
    /// records and answer queries: for reachable hosts). Off by default, so
    /// nothing is dialled that the user did not name.
    pub dht: DhtMode,
    /// The DHT's protocol: `/ipfs/kad/1.0.0` (the public IPFS DHT) or
    /// Kubo's LAN DHT `/ipfs/lan/kad/1.0.0` (which keeps private addresses).
    pub dht_protocol: String,
    /// DHT bootstrap peers (multiaddrs ending in `/p2p/<id>`), dialled at
    /// start and kept connected; none by default.
    pub bootstrap: Vec<String>,
    /// Routing V1 endpoints (`http://host:port`) asked for providers and
    /// IPNS records beside the DHT, and sent the IPNS records we publish.
    pub routers: Vec<String>,
    /// The gateway's own narinfo signing key (generated on first start).
    pub signing_key_file: Option<PathBuf>,
    /// Binary caches asked for what the index cannot answer (`[[upstreams]]`).
    pub upstreams: Vec<UpstreamConfig>,
    /// For a path an upstream signed, fetch the NAR from gateways that hold
    /// it (over IPFS, verified) before asking the upstream: the upstream's
    /// bandwidth is spared and nearby peers are often faster. `false` asks
    /// the upstream first and peers only when it fails.
    pub prefer_peers: bool,
    /// Budget for pins made by `seed_fetched` and `seed` (e.g. `"50G"`):
    /// beyond it the least recently accessed are evicted. User pins and
    /// uploads never are. None: no budget.
    pub cache_max_size: Option<String>,
    /// Upstream NARs of at most this size (e.g. `"4M"`) are fetched as
    /// soon as their narinfo is served, and the narinfos of its references
    /// looked up, since Nix asks for them next: its requests then find them
    /// here. `"0"` turns both off.
    pub upstream_prefetch_max: String,
    /// Log lines as `text` (for people) or `json` (one object per line,
    /// for collectors); `--log-format` overrides it.
    pub log_format: LogFormat,
    /// HTTP connections served at once; the next waits in the kernel's
    /// backlog.
    pub http_max_connections: usize,
    /// Seconds an HTTP connection may wait with no request in flight
    /// (keep-alive between requests, HTTP/2 with no stream).
    pub http_idle_timeout_secs: u64,
    /// Seconds a client may take to send a request header, from its first
    /// byte (slowloris).
    pub http_header_timeout_secs: u64,
    /// Seconds a client may accept no byte of a response before it is
    /// disconnected (it stopped reading).
    pub http_send_timeout_secs: u64,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?}: expected `text` or `json`"
            )),
        }
    }
}

/// One `[[upstreams]]` entry as the file writes it; checked by
/// [`Config::upstreams`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of a Nix binary cache (`http://…` or `https://…`).
    pub url: String,
    /// Public keys (`name:base64`, as in Nix's `trusted-public-keys`) whose
    /// narinfo signatures make a path from this upstream servable.
    pub keys: Vec<String>,
    /// Lower is asked first; 50 (Nix's default for HTTP caches) if absent.
    #[serde(default)]
    pub priority: Option<u32>,
}

/// Priority of an upstream that names none.
pub const DEFAULT_UPSTREAM_PRIORITY: u32 = 50;

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            ipfs_listen: vec!["/ip4/127.0.0.1/tcp/0".to_owned()],
            peers: Vec::new(),
            registry: None,
            registry_root_keys: Vec::new(),
            registry_threshold: 1,
            require: 1,
            anchors: Vec::new(),
            upload_token_file: None,
            upload_require_sig: Vec::new(),
            priority: 40,
            want_mass_query: true,
            sync_interval_secs: 600,
            seed_fetched: false,
            fetch_timeout_secs: 60,
            store_blocks_rehash: false,
            dht: DhtMode::Off,
            dht_protocol: DEFAULT_PROTOCOL.to_owned(),
            bootstrap: Vec::new(),
            routers: Vec::new(),
            signing_key_file: None,
            upstreams: Vec::new(),
            prefer_peers: true,
            cache_max_size: None,
            upstream_prefetch_max: "4M".to_owned(),
            log_format: LogFormat::Text,
            http_max_connections: 512,
            http_idle_timeout_secs: 75,
            http_header_timeout_secs: 10,
            http_send_timeout_secs: 60,
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: `require` must be at least 1 (got {0})")]
    RequireZero(u32),
    #[error("`registry` is set but no trust root is configured: add `registry_root_keys = [\"root-1:…\"]` (the public keys the registry's maintainers publish; `nixpfs registry init` prints the lines) or pass --registry-root-key KEY")]
    NoTrustRoot,
    #[error("invalid trust root (`registry_root_keys`, `registry_threshold`): {0}")]
    TrustRoot(RegistryError),
    #[error("invalid key {key:?} in upstream {url}: {reason} (expected `name:base64`, as `nix-store --generate-binary-cache-key` writes it)")]
    UpstreamKey {
        url: String,
        key: String,
        reason: String,
    },
    #[error("upstream {url} lists no `keys`: nothing it serves could ever be trusted")]
    UpstreamNoKeys { url: String },
    #[error("invalid upstream url {url:?}: {reason}")]
    UpstreamUrl { url: String, reason: String },
    #[error("invalid `cache_max_size` {value:?}: {reason}")]
    CacheMaxSize { value: String, reason: String },
    #[error("invalid `upstream_prefetch_max` {value:?}: {reason}")]
    UpstreamPrefetchMax { value: String, reason: String },
    #[error("invalid router {url:?} in `routers`: {reason}")]
    Router { url: String, reason: String },
    #[error("invalid config: `{0}` must be at least 1")]
    HttpLimitZero(&'static str),
    #[error("invalid `dht_protocol` {0:?}: a protocol name starts with `/`, e.g. \"/ipfs/kad/1.0.0\" or \"/ipfs/lan/kad/1.0.0\"")]
    DhtProtocol(String),
}

impl Config {
    /// Reads `path`; a missing file at the *default* location yields defaults,
    /// a missing file the user named explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Self::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })
    }

    /// Checks what serde cannot express, once the file and the flags are
    /// merged (a flag may supply what the file lacks), and returns the
    /// trust root it built: `None` when no registry is followed.
    pub fn validate(&self) -> Result<Option<TrustRoot>, ConfigError> {
        if self.require == 0 {
            return Err(ConfigError::RequireZero(self.require));
        }
        self.dht_protocol()?;
        self.http_limits()?;
        self.routers()?;
        self.upstreams()?;
        self.cache_max_size()?;
        self.upstream_prefetch_max()?;
        self.trust_root()
    }

    /// The `[[upstreams]]`, checked: an http(s) URL (its trailing `/`
    /// dropped) and at least one valid key each.
    pub fn upstreams(&self) -> Result<Vec<crate::trust::upstream::Upstream>, ConfigError> {
        self.upstreams
            .iter()
            .map(|u| {
                let url = u.url.trim_end_matches('/').to_owned();
                check_base_url(&url, "cache").map_err(|reason| ConfigError::UpstreamUrl {
                    url: u.url.clone(),
                    reason,
                })?;
                if u.keys.is_empty() {
                    return Err(ConfigError::UpstreamNoKeys { url: u.url.clone() });
                }
                let keys = u
                    .keys
                    .iter()
                    .map(|key| {
                        PublicKey::parse(key).map_err(|e| ConfigError::UpstreamKey {
                            url: u.url.clone(),
                            key: key.clone(),
                            reason: e.to_string(),
                        })
                    })
                    .collect::<Result<_, _>>()?;
                Ok(crate::trust::upstream::Upstream {
                    url,
                    keys,
                    priority: u.priority.unwrap_or(DEFAULT_UPSTREAM_PRIORITY),
                })
            })
            .collect()
    }

    /// The HTTP server's connection limits, each at least 1 (a zero
    /// timeout would cut every connection at once).
    pub fn http_limits(&self) -> Result<crate::http::server::Limits, ConfigError> {
        let secs = |value: u64, key: &'static str| {
            (value > 0)
                .then(|| std::time::Duration::from_secs(value))
                .ok_or(ConfigError::HttpLimitZero(key))
        };
        if self.http_max_connections == 0 {
            return Err(ConfigError::HttpLimitZero("http_max_connections"));
        }
        Ok(crate::http::server::Limits {
            max_connections: self.http_max_connections,
            idle_timeout: secs(self.http_idle_timeout_secs, "http_idle_timeout_secs")?,
            header_read_timeout: secs(self.http_header_timeout_secs, "http_header_timeout_secs")?,
            send_timeout: secs(self.http_send_timeout_secs, "http_send_timeout_secs")?,
            ..crate::http::server::Limits::default()
        })
    }

    /// The `routers`, checked: `http(s)://host[:port][/prefix]`, their
    /// trailing `/` dropped (requests append `/routing/v1/…`).
    pub fn routers(&self) -> Result<Vec<String>, ConfigError> {
        self.routers
            .iter()
            .map(|u| {
                let url = u.trim_end_matches('/');
                check_base_url(url, "router").map_err(|reason| ConfigError::Router {
                    url: u.clone(),
                    reason,
                })?;
                Ok(url.to_owned())
            })
            .collect()
    }

    /// `cache_max_size` in bytes, if set.
    pub fn cache_max_size(&self) -> Result<Option<u64>, ConfigError> {
        self.cache_max_size
            .as_deref()
            .map(|value| {
                crate::util::size::parse_size(value).map_err(|reason| ConfigError::CacheMaxSize {
                    value: value.to_owned(),
                    reason,
                })
            })
            .transpose()
    }

    /// `upstream_prefetch_max` in bytes.
    pub fn upstream_prefetch_max(&self) -> Result<u64, ConfigError> {
        crate::util::size::parse_size(&self.upstream_prefetch_max).map_err(|reason| {
            ConfigError::UpstreamPrefetchMax {
                value: self.upstream_prefetch_max.clone(),
                reason,
            }
        })
    }

    /// The DHT protocol name, checked.
    pub fn dht_protocol(&self) -> Result<rust_ipfs::StreamProtocol, ConfigError> {
        rust_ipfs::StreamProtocol::try_from_owned(self.dht_protocol.clone())
            .map_err(|_| ConfigError::DhtProtocol(self.dht_protocol.clone()))
    }

    fn trust_root(&self) -> Result<Option<TrustRoot>, ConfigError> {
        if self.registry.is_none() && self.registry_root_keys.is_empty() {
            return Ok(None);
        }
        if self.registry_root_keys.is_empty() {
            return Err(ConfigError::NoTrustRoot);
        }
        TrustRoot::new(self.registry_root_keys.clone(), self.registry_threshold)
            .map(Some)
            .map_err(ConfigError::TrustRoot)
    }
}

/// The data directory when none is given: `$XDG_DATA_HOME/nixpfs`, else
/// `~/.local/share/nixpfs`, else `./nixpfs-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("nixpfs");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join(".local/share/nixpfs");
    }
    PathBuf::from("nixpfs-data")
}

/// Why `url` is not a base URL requests can be appended to
/// (`http(s)://host[:port][/prefix]`); `what` names it in the reason.
fn check_base_url(url: &str, what: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("it must start with http:// or https://")?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err("it names no host".to_owned());
    }
    if url.contains(['?', '#']) || url.chars().any(char::is_whitespace) {
        return Err(format!(
            "a query, fragment or whitespace has no place in a {what} URL"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_default_file_gives_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load(&dir.path().join("config.toml"), false).unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Config::load(&dir.path().join("nope.toml"), true).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
    }

    #[test]
    fn file_values_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nrequire = 2\npeers = [\"/ip4/127.0.0.1/tcp/4001/p2p/x\"]\n",
        )
        .unwrap();
        let config = Config::load(&path, true).unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.require, 2);
        assert_eq!(config.peers.len(), 1);
        assert_eq!(config.priority, 40);
    }

    #[test]
    fn unknown_keys_and_zero_require_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "lisen = \"127.0.0.1:9000\"\n").unwrap();
        let err = Config::load(&path, true).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
        std::fs::write(&path, "require = 0\n").unwrap();
        assert!(matches!(
            Config::load(&path, true).unwrap().validate(),
            Err(ConfigError::RequireZero(0))
        ));
    }

    #[test]
    fn http_limits_default_to_nginx_like_values_and_refuse_zero() {
        let limits = Config::default().http_limits().unwrap();
        assert_eq!(limits, crate::http::server::Limits::default());
        let config: Config =
            toml::from_str("http_max_connections = 4\nhttp_idle_timeout_secs = 2\n").unwrap();
        let limits = config.http_limits().unwrap();
        assert_eq!(limits.max_connections, 4);
        assert_eq!(limits.idle_timeout, std::time::Duration::from_secs(2));
        let zero: Config = toml::from_str("http_send_timeout_secs = 0\n").unwrap();
        let err = zero.validate().unwrap_err();
        assert!(err.to_string().contains("http_send_timeout_secs"), "{err}");
    }

    #[test]
    fn a_registry_needs_a_configured_trust_root() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "registry = \"/srv/registry.json\"\n").unwrap();
        let config = Config::load(&path, true).unwrap();
        let err = config.validate().unwrap_err();
        assert!(matches!(err, ConfigError::NoTrustRoot));
        assert!(err.to_string().contains("registry_root_keys"), "{err}");

        let root = anchor_registry::testing::key("root-1").public();
        std::fs::write(
            &path,
            format!("registry = \"/srv/registry.json\"\nregistry_root_keys = [\"{root}\"]\n"),
        )
        .unwrap();
        let config = Config::load(&path, true).unwrap();
        let trust = config.validate().unwrap().expect("configured");
        assert_eq!((trust.keys(), trust.threshold()), (&[root.clone()][..], 1));

        std::fs::write(
            &path,
            format!("registry_root_keys = [\"{root}\"]\nregistry_threshold = 2\n"),
        )
        .unwrap();
        let err = Config::load(&path, true).unwrap().validate().unwrap_err();
        assert!(matches!(err, ConfigError::TrustRoot(_)), "{err}");

        std::fs::write(&path, "registry_root_keys = [\"not a key\"]\n").unwrap();
        let err = Config::load(&path, true).unwrap_err().to_string();
        assert!(
            err.contains("registry_root_keys") || err.contains("public key"),
            "{err}"
        );
    }

    #[test]
    fn upstreams_are_checked_naming_the_bad_key_and_its_upstream() {
        let key = anchor_registry::testing::key("cache-1").public();
        let config: Config = toml::from_str(&format!(
            "cache_max_size = \"50G\"\n[[upstreams]]\nurl = \"http://127.0.0.1:1/c/\"\nkeys = [\"{key}\"]\n\n[[upstreams]]\nurl = \"https://b.example\"\nkeys = [\"{key}\"]\npriority = 10\n"
        ))
        .unwrap();
        config.validate().unwrap();
        let upstreams = config.upstreams().unwrap();
        assert_eq!(upstreams[0].url, "http://127.0.0.1:1/c");
        assert_eq!(upstreams[0].priority, DEFAULT_UPSTREAM_PRIORITY);
        assert_eq!(upstreams[1].priority, 10);
        assert_eq!(config.cache_max_size().unwrap(), Some(50 << 30));

        let bad: Config = toml::from_str(
            "[[upstreams]]\nurl = \"http://127.0.0.1:1\"\nkeys = [\"cache-1:notbase64!\"]\n",
        )
        .unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(
            err.contains("cache-1:notbase64!") && err.contains("http://127.0.0.1:1"),
            "{err}"
        );
        let none: Config =
            toml::from_str("[[upstreams]]\nurl = \"http://127.0.0.1:1\"\nkeys = []\n").unwrap();
        assert!(matches!(
            none.validate(),
            Err(ConfigError::UpstreamNoKeys { .. })
        ));
        let ftp: Config = toml::from_str(&format!(
            "[[upstreams]]\nurl = \"ftp://x\"\nkeys = [\"{key}\"]\n"
        ))
        .unwrap();
        assert!(matches!(
            ftp.validate(),
            Err(ConfigError::UpstreamUrl { .. })
        ));
        assert!(toml::from_str::<Config>(
            "[[upstreams]]\nurl = \"http://x\"\nkeys = []\nkey = 1\n"
        )
        .is_err());
        let size = Config {
            cache_max_size: Some("lots".into()),
            ..Config::default()
        };
        assert!(matches!(
            size.validate(),
            Err(ConfigError::CacheMaxSize { .. })
        ));
    }

    #[test]
    fn dht_keys_parse_and_a_bad_protocol_is_refused() {
        let config: Config = toml::from_str(
            "dht = \"server\"\ndht_protocol = \"/ipfs/lan/kad/1.0.0\"\nbootstrap = [\"/ip4/127.0.0.1/tcp/4001/p2p/x\"]\n",
        )
        .unwrap();
        assert_eq!(config.dht, DhtMode::Server);
        assert_eq!(
            config.dht_protocol().unwrap().as_ref(),
            "/ipfs/lan/kad/1.0.0"
        );
        assert_eq!(
            Config::default().dht,
            DhtMode::Off,
            "nothing dialled by default"
        );
        assert!(toml::from_str::<Config>("dht = \"on\"\n").is_err());
        let bad = Config {
            dht_protocol: "ipfs/kad".into(),
            ..Config::default()
        };
        assert!(matches!(bad.validate(), Err(ConfigError::DhtProtocol(_))));
    }

    #[test]
    fn routers_are_http_urls_without_their_trailing_slash() {
        let config: Config =
            toml::from_str("routers = [\"http://127.0.0.1:8480/\", \"https://r.example/base\"]\n")
                .unwrap();
        assert_eq!(
            config.routers().unwrap(),
            vec!["http://127.0.0.1:8480", "https://r.example/base"]
        );
        for bad in ["ftp://x", "http://", "http://x/?q=1", "127.0.0.1:8480"] {
            let config = Config {
                routers: vec![bad.to_owned()],
                ..Config::default()
            };
            let err = config.validate().unwrap_err();
            assert!(
                matches!(&err, ConfigError::Router { url, .. } if url == bad),
                "{bad}: {err}"
            );
        }
    }
}
