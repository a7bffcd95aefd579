//! Compiles the eBPF programs (`edge-ebpf/bpf/edge.bpf.c`) with clang when clang and libbpf's
//! headers are installed, and embeds the object in the edge. Without them the edge still builds
//! and runs without the filter, and logs that it does.
//!
//! `EDGE_BPF_CLANG` names the compiler (default: the first of clang-19 ... clang-14, clang on
//! PATH), and `EDGE_BPF_CLANG=none` builds without the programs. `EDGE_BPF_REQUIRED=1` makes a
//! missing compiler a build error.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const CLANGS: &[&str] = &[
    "clang-19", "clang-18", "clang-17", "clang-16", "clang-15", "clang-14", "clang",
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(edge_bpf_object)");
    println!("cargo:rerun-if-env-changed=EDGE_BPF_CLANG");
    println!("cargo:rerun-if-env-changed=EDGE_BPF_REQUIRED");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let source_dir = manifest.join("../edge-ebpf/bpf");
    println!("cargo:rerun-if-changed={}", source_dir.display());
    let required = env::var("EDGE_BPF_REQUIRED").as_deref() == Ok("1");

    let clang = match env::var("EDGE_BPF_CLANG") {
        Ok(name) if name == "none" => None,
        Ok(name) => Some(name),
        Err(_) => CLANGS.iter().find(|c| on_path(c)).map(|c| c.to_string()),
    };
    let headers = Path::new("/usr/include/bpf/bpf_helpers.h").exists();
    let Some(clang) = clang.filter(|_| headers) else {
        let message = "eBPF programs not built: install clang (clang-19) and libbpf-dev, then rebuild (`cargo clean -p edge`); the edge runs without the XDP filter";
        if required {
            panic!("{message}");
        }
        println!("cargo:warning={message}");
        return;
    };

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("edge.bpf.o");
    let multiarch = env::var("HOST")
        .unwrap_or_default()
        .replace("-unknown-", "-");
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-c")
        .arg(source_dir.join("edge.bpf.c"))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {clang}: {e}"));
    assert!(
        status.success(),
        "{clang} failed to compile the eBPF programs"
    );
    println!("cargo:rustc-cfg=edge_bpf_object");
}

fn on_path(name: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}
