# A sketch of a NixOS module running the gateway as a system service.
{ config, lib, pkgs, ... }:
let cfg = config.services.nixpfs; in {
  options.services.nixpfs = {
    enable = lib.mkEnableOption "nixpfs gateway";
    package = lib.mkOption { type = lib.types.package; };
    registry = lib.mkOption { type = lib.types.str; description = "Registry file or URL."; };
    registryRootKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      description = "The registry's trust root: public keys its maintainers publish.";
    };
    registryThreshold = lib.mkOption { type = lib.types.int; default = 1; };
    require = lib.mkOption { type = lib.types.int; default = 1; };
    peers = lib.mkOption { type = lib.types.listOf lib.types.str; default = [ ]; };
  };
  config = lib.mkIf cfg.enable {
    systemd.services.nixpfs = {
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ];
      serviceConfig = {
        ExecStart = lib.concatStringsSep " " ([
          "${cfg.package}/bin/nixpfs" "--data-dir" "/var/lib/nixpfs" "serve"
          "--registry" cfg.registry "--require" (toString cfg.require)
          "--registry-threshold" (toString cfg.registryThreshold)
        ] ++ lib.concatMap (k: [ "--registry-root-key" k ]) cfg.registryRootKeys
          ++ lib.concatMap (p: [ "--peer" p ]) cfg.peers);
        StateDirectory = "nixpfs";
        # The admin socket (/var/lib/nixpfs/admin.sock) is guarded by the
        # directory's permissions: run CLI commands as the service user.
        StateDirectoryMode = "0700";
        DynamicUser = true;
        Restart = "on-failure";
      };
    };
    nix.settings.extra-substituters = [ "http://127.0.0.1:8480" ];
  };
}
