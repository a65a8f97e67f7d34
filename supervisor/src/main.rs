fn main() {
    // The keeper a master starts (see `baton::keeper`) is this binary
    // with a first argument no user types; it needs none of the CLI.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(baton::keeper::ARG)) {
        std::process::exit(baton::keeper::main());
    }
    std::process::exit(baton::cli::main());
}
