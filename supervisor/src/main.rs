fn main() {
    // The guardian a master starts (see `baton::guardian`) is this binary
    // with a first argument no user types; it needs none of the CLI.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(baton::guardian::ARG)) {
        std::process::exit(baton::guardian::main());
    }
    std::process::exit(baton::cli::main());
}
