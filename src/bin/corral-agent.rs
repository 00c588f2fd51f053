//! `corral-agent`: the program booted images run so that corral can see and steer their node (see
//! `corral::agent`). Logs go to standard error (the console, in a tiny image).

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    match corral::agent::run::Settings::parse(&args, &cmdline) {
        Ok(s) => corral::agent::run::run(s),
        Err(e) => {
            eprintln!("corral-agent: {e}");
            std::process::exit(2);
        }
    }
}
