# A NixOS module running the nixpfs gateway as a sandboxed system service.
#
#   imports = [ ./nixos-module.nix ];
#   services.nixpfs = {
#     enable = true;
#     package = nixpfs;   # no nixpkgs package yet: build it from this repository
#     settings = {
#       registry = "https://example.org/registry.json";
#       registry_root_keys = [ "root-1:base64…" ];
#       require = 2;
#     };
#   };
#
# `settings` is config.toml: one option per key of the gateway's `Config`
# (gateway/src/config.rs), named as in the TOML file, with the gateway's own
# defaults; unset optional keys are left out of the file, which is
# /etc/nixpfs/config.toml. The service runs with the same sandboxing as
# examples/nixpfs.service; read that file's comments for why each line is
# there. Admin commands run as root, while the service runs, with its data
# directory and config:
#   sudo NIXPFS_DATA_DIR=/var/lib/nixpfs NIXPFS_CONFIG=/etc/nixpfs/config.toml nixpfs status
{ config, lib, pkgs, ... }:
let
  cfg = config.services.nixpfs;
  inherit (lib) mkOption types;
  settingsFormat = pkgs.formats.toml { };

  # Secrets reach the dynamic user as systemd credentials: root-owned source
  # files, copied for the service into /run/credentials/nixpfs.service/.
  credentialsDir = "/run/credentials/nixpfs.service";
  credentials = lib.filterAttrs (_: file: file != null) {
    upload-token = cfg.settings.upload_token_file;
    signing-key = cfg.settings.signing_key_file;
  };
  # TOML has no null: an unset optional key is simply absent.
  present = lib.filterAttrs (_: value: value != null) cfg.settings;
  configFile = settingsFormat.generate "nixpfs-config.toml" (present
    // lib.optionalAttrs (credentials ? upload-token) {
      upload_token_file = "${credentialsDir}/upload-token";
    }
    // lib.optionalAttrs (credentials ? signing-key) {
      signing_key_file = "${credentialsDir}/signing-key";
    });

  # A path read by the service at run time: a string, so a secret is never
  # copied into the world-readable Nix store.
  runtimeFile = types.nullOr (types.strMatching "/.*");
  multiaddrs = types.listOf types.str;
in
{
  options.services.nixpfs = {
    enable = lib.mkEnableOption "the nixpfs gateway (a Nix binary cache on IPFS)";

    package = mkOption {
      type = types.package;
      description = "The nixpfs package; its `bin/nixpfs` is run.";
    };

    addSubstituter = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Add the gateway to `nix.settings.extra-substituters`. Nix uses what
        it serves only when it trusts a signature on it: add the gateway's
        key (`nixpfs nix-config` prints it) or the anchors' keys to
        `nix.settings.trusted-public-keys`.
      '';
    };

    settings = mkOption {
      default = { };
      description = "The gateway's config.toml (see gateway/src/config.rs).";
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          listen = mkOption {
            type = types.str;
            default = "127.0.0.1:8480";
            description = ''
              HTTP address (`IP:PORT`) Nix talks to. Loopback by default; the
              admin API is never served here, only on the data directory's
              Unix socket.
            '';
          };
          ipfs_listen = mkOption {
            type = multiaddrs;
            default = [ "/ip4/127.0.0.1/tcp/0" ];
            description = "libp2p listen multiaddrs of the embedded IPFS node.";
          };
          peers = mkOption {
            type = multiaddrs;
            default = [ ];
            description = "Peers to dial and keep connected (multiaddrs ending in `/p2p/<id>`).";
          };
          registry = mkOption {
            type = types.nullOr types.str;
            default = null;
            description = "The signed anchor registry: a file path or an http(s) URL.";
          };
          registry_root_keys = mkOption {
            type = types.listOf types.str;
            default = [ ];
            description = ''
              The trust root: public keys (`name:base64`, as
              `nixpfs registry init` prints them) of which
              `registry_threshold` must have signed the first registry this
              gateway accepts. Required with `registry`.
            '';
          };
          registry_threshold = mkOption {
            type = types.ints.positive;
            default = 1;
            description = "How many of `registry_root_keys` must have signed the first registry.";
          };
          require = mkOption {
            type = types.ints.positive;
            default = 1;
            description = "How many distinct registry anchors must agree before a path is served.";
          };
          anchors = mkOption {
            type = types.listOf types.str;
            default = [ ];
            description = "Only these registry anchors count (all of the registry's when empty).";
          };
          upload_token_file = mkOption {
            type = runtimeFile;
            default = null;
            description = ''
              File holding the token that authorises uploads and admin
              writes; unset, uploads are disabled. Read by systemd as root
              and handed to the service as a credential, so it may be
              root-only (e.g. `/run/secrets/nixpfs-token`).
            '';
          };
          upload_require_sig = mkOption {
            type = types.listOf types.str;
            default = [ ];
            description = ''
              Public keys (`name:base64`) of which an uploaded narinfo must
              carry a valid signature by at least one; empty: any authorised
              upload.
            '';
          };
          priority = mkOption {
            type = types.ints.unsigned;
            default = 40;
            description = "`Priority:` in `nix-cache-info` (lower is preferred by Nix).";
          };
          want_mass_query = mkOption {
            type = types.bool;
            default = true;
            description = "`WantMassQuery:` in `nix-cache-info`.";
          };
          sync_interval_secs = mkOption {
            type = types.ints.unsigned;
            default = 600;
            description = "Seconds between two anchor syncs while serving; 0 disables the timer.";
          };
          seed_fetched = mkOption {
            type = types.bool;
            default = false;
            description = "Pin what the gateway fetched for Nix, so it seeds it to others.";
          };
          prefer_peers = mkOption {
            type = types.bool;
            default = true;
            description = "Fetch an upstream-signed NAR from peer gateways that hold it before asking the upstream.";
          };
          fetch_timeout_secs = mkOption {
            type = types.ints.unsigned;
            default = 60;
            description = "Seconds to wait for a block nobody has before giving up.";
          };
          store_blocks_rehash = mkOption {
            type = types.bool;
            default = false;
            description = "Re-hash every block rebuilt from a pinned store path on each read, beside the check that its files are unchanged since the pin.";
          };
          dht = mkOption {
            type = types.enum [ "off" "client" "server" ];
            default = "off";
            description = ''
              The Kademlia DHT: `off` (only `peers` are asked), `client` (ask
              the DHT for providers, provide what we seed) or `server` (also
              store records and answer queries: for reachable hosts). Off by
              default, so nothing is dialled that the user did not name.
            '';
          };
          dht_protocol = mkOption {
            type = types.strMatching "/.*";
            default = "/ipfs/kad/1.0.0";
            description = ''
              The DHT's protocol: `/ipfs/kad/1.0.0` (the public IPFS DHT) or
              Kubo's LAN DHT `/ipfs/lan/kad/1.0.0` (which keeps private
              addresses).
            '';
          };
          bootstrap = mkOption {
            type = multiaddrs;
            default = [ ];
            description = ''
              DHT bootstrap peers (multiaddrs ending in `/p2p/<id>`), dialled
              at start and kept connected; none by default.
            '';
          };
          routers = mkOption {
            type = types.listOf (types.strMatching "https?://.*");
            default = [ ];
            description = ''
              Routing V1 endpoints (`http://host:port`, IPIP-337) asked for
              providers beside the DHT when no connected peer has a block, and
              for IPNS records; the IPNS records we publish are sent to them;
              none by default.
            '';
          };
          signing_key_file = mkOption {
            type = runtimeFile;
            default = null;
            description = ''
              The gateway's own narinfo signing key (`nixpfs key generate`).
              Unset, the gateway generates one in its data directory on first
              start. Set, the file must exist; it is handed to the service as
              a credential, so it may be root-only.
            '';
          };
          upstreams = mkOption {
            type = types.listOf (types.submodule {
              options = {
                url = mkOption {
                  type = types.strMatching "https?://.*";
                  description = "Base URL of a Nix binary cache asked for what the index cannot answer.";
                };
                keys = mkOption {
                  type = types.listOf types.str;
                  description = "Public keys (`name:base64`, as Nix's `trusted-public-keys`) whose narinfo signatures make a path from this upstream servable.";
                };
                priority = mkOption {
                  type = types.ints.unsigned;
                  default = 50;
                  description = "Lower is asked first.";
                };
              };
            });
            default = [ ];
            description = ''
              Binary caches in front of which the gateway serves (`[[upstreams]]`):
              their signatures are the trust, and what was fetched from them
              is shared with other gateways over IPFS.
            '';
          };
          cache_max_size = mkOption {
            type = types.nullOr types.str;
            default = null;
            description = ''
              Budget for pins made by `seed_fetched` and `seed` (e.g. "50G");
              over it the least recently served are evicted. User pins and
              uploads never are. Unset: no budget.
            '';
          };
          upstream_prefetch_max = mkOption {
            type = types.str;
            default = "4M";
            description = ''
              Upstream NARs up to this size (e.g. "4M") are fetched, checked
              and imported as soon as their narinfo is served, and the
              narinfos of its references looked up, since Nix asks for them
              next. "0" turns both off.
            '';
          };
          log_format = mkOption {
            type = types.enum [ "text" "json" ];
            default = "text";
            description = "Log lines as `text` (for people) or `json` (one object per line, for collectors such as journald exporters).";
          };
          http_max_connections = mkOption {
            type = types.ints.positive;
            default = 512;
            description = "HTTP connections served at once; the next waits in the kernel's backlog.";
          };
          http_idle_timeout_secs = mkOption {
            type = types.ints.positive;
            default = 75;
            description = "Seconds an HTTP connection may wait with no request in flight (keep-alive between requests, HTTP/2 with no stream).";
          };
          http_header_timeout_secs = mkOption {
            type = types.ints.positive;
            default = 10;
            description = "Seconds a client may take to send a request header, from its first byte (slowloris).";
          };
          http_send_timeout_secs = mkOption {
            type = types.ints.positive;
            default = 60;
            description = "Seconds a client may accept no byte of a response before it is disconnected (it stopped reading).";
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    # A stable path, so admin commands read the config the service reads.
    environment.etc."nixpfs/config.toml".source = configFile;
    environment.systemPackages = [ cfg.package ];
    nix.settings.extra-substituters = lib.mkIf cfg.addSubstituter [ "http://${cfg.settings.listen}" ];

    systemd.services.nixpfs = {
      description = "nixpfs: Nix binary cache on IPFS";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" "nix-daemon.socket" ];
      # The gateway runs `nix path-info` (pin) and `nix-store` (rebuild).
      path = [ config.nix.package ];
      environment = {
        NIXPFS_DATA_DIR = "/var/lib/nixpfs";
        NIXPFS_CONFIG = "/etc/nixpfs/config.toml";
        NIX_REMOTE = "daemon";
        XDG_CACHE_HOME = "/var/cache/nixpfs";
      };
      restartTriggers = [ configFile ];
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/nixpfs serve";
        Restart = "on-failure";
        RestartSec = "5s";
        LoadCredential = lib.mapAttrsToList (name: file: "${name}:${file}") credentials;

        DynamicUser = true;
        StateDirectory = "nixpfs";
        StateDirectoryMode = "0700";
        CacheDirectory = "nixpfs";
        UMask = "0077";

        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        PrivateMounts = true;
        ReadOnlyPaths = [ "/nix/store" ];

        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        NoNewPrivileges = true;
        RestrictSUIDSGID = true;
        RestrictNamespaces = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RestrictRealtime = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        PrivateUsers = true;
        # AF_NETLINK: libp2p watches interfaces when listening on 0.0.0.0.
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged" ];
        SystemCallErrorNumber = "EPERM";
      };
    };
  };
}
