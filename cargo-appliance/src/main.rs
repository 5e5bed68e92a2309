//! `cargo appliance`: a shim over `appliance_core::cli`, which holds the commands.

fn main() -> std::process::ExitCode {
    appliance_core::cli::main()
}
