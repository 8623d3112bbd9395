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
    let cli = match vramcal::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version: clap's own output, exit 0
        Err(e) => {
            // Bad input is one line, exit 2: clap's first line names the argument; its usage
            // block and tips would make a multi-line error of it.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("error: invalid arguments");
            // an enum flag's accepted values are on clap's second line: keep them on this one
            let accepted = text
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with("[possible values:"))
                .map(|l| format!(" {l}"))
                .unwrap_or_default();
            eprintln!("{first}{accepted} (see --help)");
            std::process::exit(2);
        }
    };
    if let Err(err) = vramcal::cli::run(cli) {
        // `{:#}` joins the cause chain on one line; a cause that itself spans lines (a parser's
        // snippet) is folded so the message stays one line.
        let text = format!("{err:#}");
        let one_line: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        eprintln!("error: {}", one_line.join(" "));
        std::process::exit(vramcal::error::exit_code(&err));
    }
}
