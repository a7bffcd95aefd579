//! The side agent (control plane): Docker labels to routes, health probes, ACME, and the ops
//! control socket. Not implemented yet; the edge runs standalone from a routes file meanwhile.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    eprintln!("agent: not implemented yet; run `edge --routes-file FILE` standalone");
    std::process::ExitCode::from(2)
}
