//! What a gateway writes when its stderr is a file (a log file, journald):
//! plain text, no terminal escape codes.

use e2e::gateway::Gateway;
use e2e::run_ok_str;

#[test]
fn a_log_file_gets_no_escape_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = Gateway::start(&dir.path().join("gw"), &[]);
    run_ok_str(gw.cli().arg("status"));
    let log = gw.log_text();
    assert!(log.contains("INFO"), "the gateway logged something: {log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in the log file:\n{log:?}"
    );
}
