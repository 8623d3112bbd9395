//! `vramcal` binary: parse the command line, run it, map errors to exit codes
//! (2 = bad input naming the field, 1 = anything else).

use clap::Parser;

fn main() {
    let cli = vramcal::cli::Cli::parse();
    if let Err(err) = vramcal::cli::run(cli) {
        eprintln!("error: {err:#}");
        std::process::exit(vramcal::error::exit_code(&err));
    }
}
