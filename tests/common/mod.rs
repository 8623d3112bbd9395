//! Helpers shared by the CLI test binaries (a `tests/` subfolder, so cargo does not build it as a
//! test binary of its own).

use std::process::Command;

/// Runs the vramcal binary from the repository root: (exit code, stdout, stderr). A process
/// ended by a signal reports -1.
pub fn vramcal(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vramcal"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run vramcal");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
