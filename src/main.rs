//! `vramcal` binary: parse the command line, run it, map errors to exit codes
//! (2 = bad input naming the field, 1 = anything else).

use clap::Parser;

fn main() {
    // Rust starts with SIGPIPE ignored, so printing into a closed pipe (`vramcal fit ... | head`)
    // returns an error that `println!` turns into a panic (exit 101). Restoring the default makes
    // the process end quietly the way any Unix filter does; rows already written were flushed
    // one by one, so nothing measured is lost.
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = vramcal::cli::Cli::parse();
    if let Err(err) = vramcal::cli::run(cli) {
        eprintln!("error: {err:#}");
        std::process::exit(vramcal::error::exit_code(&err));
    }
}
