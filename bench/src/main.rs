//! The load harness that measures edge against nginx, HAProxy, Traefik and Caddy. Not
//! implemented yet.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    eprintln!("bench: not implemented yet");
    std::process::ExitCode::from(2)
}
