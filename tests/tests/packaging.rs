//! The packaging in `examples/`: the systemd unit is one systemd accepts
//! (`systemd-analyze verify`) and rates as well sandboxed
//! (`systemd-analyze security`); the NixOS module parses, has an option for
//! every key of the gateway's `Config`, and defaults each as the gateway does.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use e2e::{nixpfs_bin, require_tool};
use gateway::config::Config;

/// The highest overall exposure `systemd-analyze security` may give the
/// unit (0 is fully locked down, 10 unprotected; systemd calls < 2 "OK").
const MAX_EXPOSURE: f64 = 2.0;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

/// stdout and stderr of `out`, one string.
fn all_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The example unit, with `ExecStart` pointing at the freshly built binary
/// (verify checks that the binary exists), as `dir/nixpfs.service`.
fn unit_for_built_binary(dir: &Path) -> PathBuf {
    let text = read(&example("nixpfs.service"));
    let exec = "\nExecStart=/usr/bin/nixpfs serve\n";
    assert!(
        text.contains(exec),
        "the example unit runs `/usr/bin/nixpfs serve`"
    );
    let bin = nixpfs_bin();
    let text = text.replace(exec, &format!("\nExecStart={} serve\n", bin.display()));
    let unit = dir.join("nixpfs.service");
    fs::write(&unit, text).expect("write unit");
    unit
}

/// `systemd-analyze ARGS… UNIT`, without colour or pager.
fn systemd_analyze(args: &[&str], unit: &Path) -> Output {
    output(
        Command::new("systemd-analyze")
            .args(args)
            .arg(unit)
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_PAGER", ""),
    )
}

#[test]
#[cfg_attr(
    missing_systemd_analyze,
    ignore = "needs systemd-analyze (Debian `systemd`); scripts/test installs it"
)]
fn systemd_accepts_every_line_of_the_unit() {
    require_tool("systemd-analyze");
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_for_built_binary(dir.path());
    let out = systemd_analyze(&["verify"], &unit);
    let text = all_text(&out);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed ({}):\n{text}",
        out.status
    );
    // verify exits 0 on an unknown or misspelt directive or a value it
    // cannot parse: it only warns, naming the unit's file and line.
    let unit_name = unit.to_string_lossy();
    let complaints: Vec<&str> = text
        .lines()
        .filter(|line| {
            line.contains(&*unit_name) || line.contains("Unknown") || line.contains("ignoring")
        })
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complained about the unit:\n{}",
        complaints.join("\n")
    );
}

#[test]
#[cfg_attr(
    missing_systemd_analyze,
    ignore = "needs systemd-analyze (Debian `systemd`); scripts/test installs it"
)]
fn the_unit_is_sandboxed_below_the_exposure_bar() {
    require_tool("systemd-analyze");
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_for_built_binary(dir.path());
    // --offline reads the file itself: no running systemd needed.
    let out = systemd_analyze(&["security", "--offline=yes", "--no-pager"], &unit);
    let text = all_text(&out);
    assert!(
        out.status.success(),
        "systemd-analyze security failed ({}):\n{text}",
        out.status
    );
    let overall = text
        .lines()
        .find(|line| line.contains("Overall exposure level for nixpfs.service:"))
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"));
    let exposure: f64 = overall
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the exposure in {overall:?}"));
    let unprotected: Vec<&str> = text.lines().filter(|l| l.starts_with('✗')).collect();
    assert!(
        exposure < MAX_EXPOSURE,
        "{overall}: above the bar {MAX_EXPOSURE}; unprotected:\n{}",
        unprotected.join("\n")
    );
}

/// `nix-instantiate ARGS…` with an empty config (no warnings from the
/// machine's nix.conf) and without opening the Nix store.
fn nix_instantiate(args: &[&str]) -> Output {
    require_tool("nix-instantiate");
    let conf = tempfile::tempdir().expect("tempdir");
    output(
        Command::new("nix-instantiate")
            .arg("--readonly-mode")
            .args(args)
            .env("NIX_CONF_DIR", conf.path())
            .env_remove("NIX_PATH"),
    )
}

#[test]
#[cfg_attr(
    missing_nix_instantiate,
    ignore = "needs nix-instantiate (Debian `nix-bin`); scripts/test installs it"
)]
fn the_nixos_module_parses() {
    let module = example("nixos-module.nix");
    let out = nix_instantiate(&["--parse", &module.to_string_lossy()]);
    assert!(
        out.status.success(),
        "nix-instantiate --parse {} failed:\n{}",
        module.display(),
        all_text(&out)
    );
}

/// The names of `Config`'s fields, read from its source: a key added there
/// without a module option fails [`every_config_key_is_a_module_option`].
fn config_fields() -> Vec<String> {
    let source = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway/src/config.rs"));
    let body = source
        .split_once("pub struct Config {")
        .and_then(|(_, rest)| rest.split_once("\n}"))
        .map(|(body, _)| body)
        .expect("`pub struct Config { … }` in gateway/src/config.rs");
    let fields: Vec<String> = body
        .lines()
        .filter_map(|line| line.trim().strip_prefix("pub "))
        .filter_map(|decl| decl.split_once(':'))
        .map(|(name, _)| name.trim().to_owned())
        .collect();
    assert!(
        fields.len() >= 19 && fields.iter().any(|f| f == "listen"),
        "the scan of Config found too few fields: {fields:?}"
    );
    fields
}

#[test]
fn every_config_key_is_a_module_option() {
    let module = read(&example("nixos-module.nix"));
    let options: Vec<&str> = module
        .lines()
        .filter_map(|line| line.trim().strip_suffix(" = mkOption {"))
        .collect();
    let missing: Vec<String> = config_fields()
        .into_iter()
        .filter(|field| !options.contains(&field.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "config keys without an option in examples/nixos-module.nix: {missing:?}"
    );
}

/// Evaluates the module's `settings` options with stand-ins for `lib` and
/// `pkgs` (there is no nixpkgs here) and returns each option's default.
const DEFAULTS_NIX: &str = r#"{ modulePath }:
let
  stubType = name: { inherit name; };
  lib = {
    mkOption = option: option;
    mkEnableOption = _: { };
    mkIf = _: _: { };
    filterAttrs = _: _: { };
    optionalAttrs = _: _: { };
    mapAttrsToList = _: _: [ ];
    types = {
      str = stubType "str";
      bool = stubType "bool";
      package = stubType "package";
      ints = { unsigned = stubType "unsigned"; positive = stubType "positive"; };
      listOf = stubType;
      nullOr = stubType;
      enum = stubType;
      strMatching = stubType;
      submodule = module: { inherit (module) options; };
    };
  };
  pkgs.formats.toml = _: { type = stubType "toml"; };
  module = import (/. + modulePath) { inherit lib pkgs; config = { }; };
in
builtins.mapAttrs (_: option: option.default) module.options.services.nixpfs.settings.type.options
"#;

#[test]
#[cfg_attr(
    missing_nix_instantiate,
    ignore = "needs nix-instantiate (Debian `nix-bin`); scripts/test installs it"
)]
fn the_module_defaults_are_the_gateway_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stub = dir.path().join("defaults.nix");
    fs::write(&stub, DEFAULTS_NIX).expect("write stub");
    let module = fs::canonicalize(example("nixos-module.nix")).expect("module path");
    let out = nix_instantiate(&[
        "--eval",
        "--strict",
        "--json",
        "--argstr",
        "modulePath",
        &module.to_string_lossy(),
        &stub.to_string_lossy(),
    ]);
    assert!(
        out.status.success(),
        "evaluating the module's defaults failed:\n{}",
        all_text(&out)
    );
    let defaults: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    // Config refuses unknown keys, so an option the gateway lacks fails here.
    let config: Config = serde_json::from_value(defaults.clone())
        .unwrap_or_else(|e| panic!("the module's defaults are not a Config ({e}):\n{defaults}"));
    assert_eq!(
        config,
        Config::default(),
        "the module's defaults differ from the gateway's:\n{defaults}"
    );
}
