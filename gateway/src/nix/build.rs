//! Rebuilding with the local Nix, through its own commands (`nix-store`,
//! `nix show-derivation`): build a derivation whose outputs are absent, or
//! re-run it with `--check --keep-failed` when they are present, and say
//! where each output's bytes of *this* build are.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Why Nix could not tell us what we asked (build failures are outcomes,
/// not errors: see [`OutputResult`]).
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("cannot run `{program}` (is Nix installed and on PATH?): {source}")]
    Spawn {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("unexpected output from `{command}`: {message}")]
    Output { command: String, message: String },
    #[error("{path} has no known derivation in the local store (`nix-store -q --deriver` says unknown-deriver): pass its .drv instead")]
    NoDeriver { path: String },
}

/// How an output was obtained in this rebuild.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The output was absent: built here.
    Built,
    /// The output was present: rebuilt with `--check` and compared.
    Checked,
}

/// One output of a rebuilt derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputResult {
    pub output: String,
    pub mode: Mode,
    /// Where this build's bytes are: the output itself, or `<output>.check`
    /// when Nix found they differ from what the store held. `Err` says why
    /// there is no result (build failed, or Nix stopped checking).
    pub result: Result<PathBuf, String>,
}

/// Everything one derivation's rebuild produced, and the time Nix took.
#[derive(Debug, Clone)]
pub struct DrvRebuild {
    pub outputs: Vec<OutputResult>,
    pub nix_time: Duration,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ShownDrv {
    outputs: BTreeMap<String, ShownOutput>,
    #[serde(default)]
    input_drvs: BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct ShownOutput {
    #[serde(default)]
    path: Option<String>,
}

/// A derivation's output paths (by output name) and input derivations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    pub path: String,
    pub outputs: BTreeMap<String, String>,
    pub input_drvs: Vec<String>,
}

fn nix_store() -> Command {
    Command::new("nix-store")
}

/// Runs a Nix command; `Ok` holds its output whatever the exit status.
fn run(program: &'static str, cmd: &mut Command) -> Result<std::process::Output, NixError> {
    cmd.output()
        .map_err(|source| NixError::Spawn { program, source })
}

fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args().take(6) {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    if cmd.get_args().len() > 6 {
        text.push_str(" …");
    }
    text
}

/// Runs a query that must succeed; returns stdout.
fn query(program: &'static str, mut cmd: Command) -> Result<String, NixError> {
    let out = run(program, &mut cmd)?;
    if !out.status.success() {
        return Err(NixError::Failed {
            command: describe(&cmd),
            stderr: last_lines(&out.stderr, 5),
        });
    }
    String::from_utf8(out.stdout).map_err(|_| NixError::Output {
        command: describe(&cmd),
        message: "not UTF-8".to_owned(),
    })
}

/// The derivation of each target: itself if it is a `.drv`, else the
/// deriver the local store recorded for the output path.
pub fn derivations_of(targets: &[String]) -> Result<Vec<String>, NixError> {
    let outputs: Vec<&String> = targets.iter().filter(|t| !t.ends_with(".drv")).collect();
    let mut derivers = BTreeMap::new();
    if !outputs.is_empty() {
        let mut cmd = nix_store();
        cmd.args(["--query", "--deriver", "--"]).args(&outputs);
        let text = query("nix-store", cmd)?;
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() != outputs.len() {
            return Err(NixError::Output {
                command: "nix-store --query --deriver".to_owned(),
                message: format!("{} lines for {} paths", lines.len(), outputs.len()),
            });
        }
        for (path, drv) in outputs.iter().zip(lines) {
            if !drv.ends_with(".drv") {
                return Err(NixError::NoDeriver {
                    path: (*path).clone(),
                });
            }
            derivers.insert((*path).clone(), drv.to_owned());
        }
    }
    let mut out = Vec::new();
    for target in targets {
        let drv = derivers
            .get(target)
            .cloned()
            .unwrap_or_else(|| target.clone());
        if !out.contains(&drv) {
            out.push(drv);
        }
    }
    Ok(out)
}

/// Outputs and inputs of derivations, from `nix show-derivation`.
pub fn show_derivations(drvs: &[String]) -> Result<Vec<Derivation>, NixError> {
    if drvs.is_empty() {
        return Ok(Vec::new());
    }
    let mut cmd = Command::new("nix");
    cmd.args([
        "--extra-experimental-features",
        "nix-command",
        "show-derivation",
        "--",
    ])
    .args(drvs);
    let text = query("nix", cmd)?;
    parse_show_derivation(&text)
}

/// Parses `nix show-derivation` JSON (Nix 2.8 and later).
pub fn parse_show_derivation(text: &str) -> Result<Vec<Derivation>, NixError> {
    let shown: BTreeMap<String, ShownDrv> =
        serde_json::from_str(text).map_err(|e| NixError::Output {
            command: "nix show-derivation".to_owned(),
            message: e.to_string(),
        })?;
    shown
        .into_iter()
        .map(|(path, drv)| {
            let mut outputs = BTreeMap::new();
            for (name, output) in drv.outputs {
                let Some(out) = output.path else {
                    return Err(NixError::Output {
                        command: "nix show-derivation".to_owned(),
                        message: format!("output {name} of {path} has no fixed path (content-addressed derivations are not supported)"),
                    });
                };
                outputs.insert(name, out);
            }
            Ok(Derivation {
                path,
                outputs,
                input_drvs: drv.input_drvs.into_keys().collect(),
            })
        })
        .collect()
}

/// Which of `paths` the local store does not hold.
pub fn invalid_paths(paths: &[String]) -> Result<BTreeSet<String>, NixError> {
    if paths.is_empty() {
        return Ok(BTreeSet::new());
    }
    let mut cmd = nix_store();
    cmd.args(["--check-validity", "--print-invalid", "--"])
        .args(paths);
    Ok(query("nix-store", cmd)?
        .lines()
        .map(str::to_owned)
        .collect())
}

/// The store paths a `.check` result may refer to: the derivation's whole
/// closure with outputs (its input closure is within it), derivations left out.
pub fn reference_candidates(drv: &str) -> Result<Vec<String>, NixError> {
    let mut cmd = nix_store();
    cmd.args(["--query", "--requisites", "--include-outputs", "--", drv]);
    Ok(query("nix-store", cmd)?
        .lines()
        .filter(|p| !p.ends_with(".drv"))
        .map(str::to_owned)
        .collect())
}

/// Builds (absent outputs) or checks (present ones) one derivation;
/// `invalid` holds the outputs the store lacked (see [`invalid_paths`],
/// asked once for a whole run).
pub fn rebuild(drv: &Derivation, invalid: &BTreeSet<String>) -> Result<DrvRebuild, NixError> {
    let outputs: Vec<String> = drv.outputs.values().cloned().collect();
    let invalid: BTreeSet<String> = outputs
        .iter()
        .filter(|o| invalid.contains(*o))
        .cloned()
        .collect();
    let mut nix_time = Duration::ZERO;
    let mut results: BTreeMap<String, OutputResult> = BTreeMap::new();

    if !invalid.is_empty() {
        // Inputs may come from substituters; the derivation itself is built
        // here, never substituted, or it would not be an independent build.
        let mut failure = None;
        if !drv.input_drvs.is_empty() {
            let mut cmd = nix_store();
            cmd.args(["--realise", "--"]).args(&drv.input_drvs);
            let (ok, stderr, took) = timed(&mut cmd)?;
            nix_time += took;
            if !ok {
                failure = Some(format!(
                    "building the inputs failed: {}",
                    last_lines(&stderr, 5)
                ));
            }
        }
        if failure.is_none() {
            let mut cmd = nix_store();
            cmd.args(["--realise", "--option", "substitute", "false", "--"])
                .arg(&drv.path);
            let (ok, stderr, took) = timed(&mut cmd)?;
            nix_time += took;
            if !ok {
                failure = Some(format!("the build failed: {}", last_lines(&stderr, 5)));
            }
        }
        for out in &invalid {
            results.insert(
                out.clone(),
                OutputResult {
                    output: out.clone(),
                    mode: Mode::Built,
                    result: match &failure {
                        None => Ok(PathBuf::from(out)),
                        Some(reason) => Err(reason.clone()),
                    },
                },
            );
        }
    }

    let present: Vec<&String> = outputs.iter().filter(|o| !invalid.contains(*o)).collect();
    if !present.is_empty() {
        let mut cmd = nix_store();
        cmd.args(["--realise", "--check", "--keep-failed", "--"])
            .arg(&drv.path);
        let (ok, stderr, took) = timed(&mut cmd)?;
        nix_time += took;
        remove_kept_build_dirs(&stderr);
        let differing: BTreeMap<String, String> = parse_differing(&stderr).into_iter().collect();
        for out in present {
            let result = match differing.get(out) {
                Some(check) => Ok(PathBuf::from(check)),
                None if ok => Ok(PathBuf::from(out)),
                // Nix stops at the first differing output, and a failed
                // build leaves nothing to compare.
                None => Err(format!(
                    "`nix-store --realise --check` did not check it: {}",
                    last_lines(&stderr, 5)
                )),
            };
            results.insert(
                out.clone(),
                OutputResult {
                    output: out.clone(),
                    mode: Mode::Checked,
                    result,
                },
            );
        }
    }
    Ok(DrvRebuild {
        outputs: results.into_values().collect(),
        nix_time,
    })
}

fn timed(cmd: &mut Command) -> Result<(bool, Vec<u8>, Duration), NixError> {
    let started = Instant::now();
    let out = run("nix-store", cmd)?;
    Ok((out.status.success(), out.stderr, started.elapsed()))
}

/// `(output, output.check)` for each "may not be deterministic" error.
pub fn parse_differing(stderr: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(stderr);
    text.lines()
        .filter(|l| l.contains("may not be deterministic"))
        .filter_map(|line| {
            let rest = &line[line.find("output '")? + "output '".len()..];
            let (output, rest) = rest.split_once("' differs from '")?;
            let check = rest.split('\'').next()?;
            (check.strip_suffix(".check") == Some(output))
                .then(|| (output.to_owned(), check.to_owned()))
        })
        .collect()
}

/// Build directories Nix kept because of `--keep-failed`.
pub fn parse_kept_build_dirs(stderr: &[u8]) -> Vec<PathBuf> {
    let text = String::from_utf8_lossy(stderr);
    text.lines()
        .filter_map(|l| l.split_once("keeping build directory '"))
        .filter_map(|(_, rest)| rest.split('\'').next())
        .map(PathBuf::from)
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("nix-build-"))
        })
        .collect()
}

/// `--keep-failed` is only wanted for `<out>.check`; the temporary build
/// directories it also keeps would pile up with every differing rebuild.
fn remove_kept_build_dirs(stderr: &[u8]) {
    for dir in parse_kept_build_dirs(stderr) {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::debug!(dir = %dir.display(), "cannot remove kept build directory: {e}");
        }
    }
}

fn last_lines(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("warning:"))
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const STDERR: &[u8] = b"warning: the group 'nixbld' specified in 'build-users-group' does not exist
checking outputs of '/nix/store/v73qyz82r620bqm2l7yb0fgd6lvfmd5r-nondet.drv'...
note: keeping build directory '/tmp/nix-build-nondet.drv-0'
error: derivation '/nix/store/v73qyz82r620bqm2l7yb0fgd6lvfmd5r-nondet.drv' may not be deterministic: output '/nix/store/q0qjd0ilw9h0qfszb204zvpinvhbkprw-nondet' differs from '/nix/store/q0qjd0ilw9h0qfszb204zvpinvhbkprw-nondet.check'
";

    #[test]
    fn finds_the_differing_output_and_its_check_copy() {
        assert_eq!(
            parse_differing(STDERR),
            [(
                "/nix/store/q0qjd0ilw9h0qfszb204zvpinvhbkprw-nondet".to_owned(),
                "/nix/store/q0qjd0ilw9h0qfszb204zvpinvhbkprw-nondet.check".to_owned()
            )]
        );
        assert!(parse_differing(b"error: builder for 'x.drv' failed").is_empty());
    }

    #[test]
    fn differs_without_keep_failed_names_no_check_copy() {
        let line = b"error: derivation '/nix/store/v73qyz82r620bqm2l7yb0fgd6lvfmd5r-nondet.drv' may not be deterministic: output '/nix/store/q0qjd0ilw9h0qfszb204zvpinvhbkprw-nondet' differs";
        assert!(parse_differing(line).is_empty());
    }

    #[test]
    fn finds_kept_build_directories_only() {
        assert_eq!(
            parse_kept_build_dirs(STDERR),
            [PathBuf::from("/tmp/nix-build-nondet.drv-0")]
        );
        assert!(parse_kept_build_dirs(b"note: keeping build directory '/home'").is_empty());
    }

    #[test]
    fn reads_outputs_and_inputs_of_show_derivation() {
        let json = r#"{"/nix/store/v73qyz82r620bqm2l7yb0fgd6lvfmd5r-nondet.drv":{"outputs":{"out":{"path":"/nix/store/q0qjd0ilw9h0qfszb204zvpinvhbkprw-nondet"}},"inputSrcs":[],"inputDrvs":{"/nix/store/cvvma8r10hmkgcyhidkgr9dhpbp8v6n5-det.drv":["out"]},"system":"x86_64-linux","builder":"/bin/sh","args":[],"env":{}}}"#;
        let drvs = parse_show_derivation(json).unwrap();
        assert_eq!(drvs.len(), 1);
        assert_eq!(
            drvs[0].outputs["out"],
            "/nix/store/q0qjd0ilw9h0qfszb204zvpinvhbkprw-nondet"
        );
        assert_eq!(
            drvs[0].input_drvs,
            ["/nix/store/cvvma8r10hmkgcyhidkgr9dhpbp8v6n5-det.drv"]
        );
        let floating = r#"{"/nix/store/v73qyz82r620bqm2l7yb0fgd6lvfmd5r-x.drv":{"outputs":{"out":{"hashAlgo":"sha256"}},"inputDrvs":{}}}"#;
        assert!(parse_show_derivation(floating).is_err());
    }
}
