//! `ember-runtime`: the OCI runtime command line (see `ember::runtime`).

fn main() -> std::process::ExitCode {
    ember::runtime::main()
}
